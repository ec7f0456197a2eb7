"""Every row of docs/BAD_INPUTS.md, fed in where it says, gets the message it says."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest

from flows.cli import main
from mlx_model.checkpoint import load_model, save_model
from mlx_model.config import GPTConfig, TrainConfig
from mlx_model.model import GPT
from tasks.store import ArtifactStore

DOC = Path(__file__).resolve().parents[1] / "docs" / "BAD_INPUTS.md"
FLOW_ROW = re.compile(r"^\| (flow|cli) \| ([^|]+?) \| `(.+)` \| `(.+)` \| `(.+?)`")
ROW = re.compile(r"^\| (\w+) \| ([^|]+?) \| `(.+)` \| `(.+?)`")


def rows() -> list[tuple[str, ...]]:
    found = []
    for line in DOC.read_text().splitlines():
        if match := FLOW_ROW.match(line):
            found.append(match.groups())
        elif match := ROW.match(line):
            where, parameter, value, message = match.groups()
            found.append((where, parameter, value, "", message))
    assert len(found) >= 50, "docs/BAD_INPUTS.md lost its rows"
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


def placed(text: str, files: dict) -> str:
    for name, path in files.items():
        text = text.replace(name, str(path))
    return text


def flow_params(parameter: str, value, corpus: Path, artifacts: Path, files: dict) -> dict:
    """The flow's parameters: the tiny preset on the local corpus, with the row's bad value."""
    source = {"source": str(corpus), "sha256": hashlib.sha256(corpus.read_bytes()).hexdigest()}
    params = {
        "preset": "tiny",
        "artifacts": str(artifacts),
        "overrides": {"source": source, "sampling": {"max_tokens": 20}},
    }
    if isinstance(value, str):
        value = placed(value, files)
    if parameter == "*":
        params.update(value)
    elif "." in parameter:
        section, field = parameter.split(".")
        params["overrides"].setdefault(section, {})[field] = value
        if parameter == "source.source" and Path(value).is_file():
            source["sha256"] = hashlib.sha256(Path(value).read_bytes()).hexdigest()
    else:
        params[parameter] = value
    return params


def cli_args(command: str, params: dict) -> list[str]:
    """The row's command line, after the options that point it at the local corpus."""
    argv = shlex.split(command)
    source = params["overrides"]["source"]
    base = ["--preset", "tiny", "--artifacts", params["artifacts"], "--max-tokens", "20"]
    base += ["--source", source["source"], "--sha256", source["sha256"]]
    if "--source" in argv:  # the row's source, with its own digest
        base = base[:6] + ["--sha256", source["sha256"]]
    if argv[0] == "sweep":  # no sampling options: a sweep does not sample
        base = [a for i, a in enumerate(base) if "--max-tokens" not in base[max(i - 1, 0) : i + 1]]
    return [
        *argv[:1],
        *([argv[1]] if argv[0] == "stage" else []),
        *base,
        *argv[1 + (argv[0] == "stage") :],
    ]


def written(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.parametrize("row", rows(), ids=row_id)
def test_bad_input_gets_its_message(row, files, corpus_path, prefect_harness, capsys, tmp_path):
    where, parameter, literal, command, message = row
    value = ast.literal_eval(literal)
    if where in ("flow", "cli"):
        params = flow_params(parameter, value, corpus_path, tmp_path / "flow", files)
        if where == "flow":
            from flows.pipeline import pipeline

            with pytest.raises(Exception) as info:
                pipeline(**params)
            assert message in str(info.value), str(info.value)
        params["artifacts"] = str(tmp_path / "cli")
        argv = cli_args(placed(command, files), params)
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2, err
        assert message in err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
        root = tmp_path / "cli"
        assert not (root / "runs").exists()  # no run manifest: the run was rejected
        if (
            not any(
                s in parameter
                for s in ("source.source", "sha256", "max_bytes", "val_fraction", "prompt", "stop")
            )
            or "must" in message
        ):
            assert written(root) == [], written(root)  # refused before any work
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
