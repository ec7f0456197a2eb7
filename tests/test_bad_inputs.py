"""Every row of docs/BAD_INPUTS.md, fed in where it says, gets the message it says."""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

import pytest

from flows.cli import main
from mlx_model.checkpoint import load_model, save_model
from mlx_model.config import GPTConfig, TrainConfig
from mlx_model.model import GPT
from tasks.store import ArtifactStore

DOC = Path(__file__).resolve().parents[1] / "docs" / "BAD_INPUTS.md"
ROW = re.compile(r"^\| (\w+) \| ([^|]+?) \| `(.+)` \| `(.+?)`")


def rows() -> list[tuple[str, str, str, str]]:
    found = [ROW.match(line).groups() for line in DOC.read_text().splitlines() if ROW.match(line)]
    assert len(found) >= 40, "docs/BAD_INPUTS.md lost its rows"
    return found


def row_id(row) -> str:
    return f"{row[0]}-{row[1]}-{row[2]}"[:60]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-files")
    (d / "empty.txt").write_bytes(b"")
    (d / "binary.txt").write_bytes(b"To be\x00or not\x00to be\n" * 10)
    (d / "a-file").write_text("not a folder")
    return {
        "<empty-file>": d / "empty.txt",
        "<binary-file>": d / "binary.txt",
        "<a-file>": d / "a-file",
    }


@pytest.fixture(scope="module")
def flow_base(tmp_path_factory, corpus_path, corpus_sha):
    return {
        "preset": "tiny",
        "artifacts": str(tmp_path_factory.mktemp("bad-inputs-artifacts")),
        "source": str(corpus_path),
        "sha256": corpus_sha,
        "max_tokens": 20,
    }


def flow_params(parameter: str, value, base: dict, files: dict) -> dict:
    params = dict(base)
    if parameter == "*":
        params.update(value)
        return params
    if isinstance(value, str) and value in files:
        path = files[value]
        value = str(path)
        if parameter == "source":
            params["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    params[parameter] = value
    return params


@pytest.mark.parametrize("row", rows(), ids=row_id)
def test_bad_input_gets_its_message(row, files, flow_base, prefect_harness, capsys, tmp_path):
    where, parameter, literal, message = row
    value = ast.literal_eval(literal)
    if where == "flow":
        from flows.pipeline import pipeline

        with pytest.raises(Exception) as info:
            pipeline(**flow_params(parameter, value, flow_base, files))
        assert message in str(info.value), str(info.value)
    elif where == "cli":
        command, _, option = parameter.partition(" ")
        argv = [command, option, value] if option else [command, value]
        try:
            code = main([*argv, "--artifacts", str(tmp_path)])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        assert code == 2
        assert message in capsys.readouterr().err
    elif where == "config":
        cls_name, field = parameter.split(".")
        cls = {"GPTConfig": GPTConfig, "TrainConfig": TrainConfig}[cls_name]
        with pytest.raises(ValueError) as info:
            cls(**{field: value})
        assert message in str(info.value)
    elif where == "checkpoint":
        model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_emb=16))
        save_model(tmp_path, model)
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "n_emb": value}))
        with pytest.raises(ValueError) as info:
            load_model(tmp_path)
        assert message in str(info.value)
    elif where == "store":
        with pytest.raises(ValueError) as info:
            if parameter == "run name":
                ArtifactStore(tmp_path, run=value)
            else:
                ArtifactStore(tmp_path).stage_dir(value, "0" * 64)
        assert message in str(info.value)
    else:
        pytest.fail(f"unknown 'where' {where!r} in {DOC}")
