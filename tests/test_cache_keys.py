"""What a stage's cache key covers: every source file the stage can execute, found from its
imports, and the settings that change its numbers; nothing else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_model.config import TINY, DataConfig
from tasks.download import SourceConfig, download_corpus
from tasks.prepare import build_vocab, tokenize
from tasks.store import ArtifactStore, _source_files, code_version
from tasks.train import train_model

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "mlx_model" / "ops" / "csrc" / "cpu_kernels.cpp"


def names(module: str) -> set[str]:
    return {str(p.relative_to(ROOT)) for p in _source_files(module)}


def test_each_stage_digests_the_code_it_can_run():
    train = names("tasks.train")
    assert {"mlx_model/ops/csrc/cpu_kernels.cpp", "mlx_model/ops/native.py"} <= train
    assert {"mlx_model/ops/cpu.py", "mlx_model/config.py", "mlx_model/files.py"} <= train
    assert {"mlx_model/model.py", "mlx_model/train.py", "tasks/train.py"} <= train
    for stage in ("tasks.evaluate", "tasks.sample"):
        assert "mlx_model/ops/csrc/cpu_kernels.cpp" in names(stage)
    assert "mlx_model/evaluate.py" in names("tasks.evaluate")
    assert "mlx_model/generate.py" in names("tasks.sample")
    vocab = names("tasks.prepare")
    assert "tasks/prepare.py" in vocab and "mlx_model/data.py" in vocab
    for stage in ("tasks.download", "tasks.prepare"):  # no model code: kernels do not touch them
        assert not any(n.startswith(("mlx_model/ops", "mlx_model/model")) for n in names(stage))
    assert len({code_version(m) for m in ("tasks.train", "tasks.evaluate", "tasks.sample")}) == 3


def test_settings_that_change_the_numbers_change_the_key(
    tmp_path, corpus_path, corpus_sha, monkeypatch
):
    store = ArtifactStore(tmp_path)
    corpus = download_corpus.fn(store, SourceConfig(str(corpus_path), corpus_sha))
    vocab = build_vocab.fn(store, corpus)
    tokens = tokenize.fn(store, corpus, vocab, DataConfig())
    train = TINY.train.replace(max_iters=2, eval_interval=2, checkpoint_interval=2)

    def key(**env: str) -> str:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return train_model.fn(store, tokens, vocab, TINY.model, train).key

    base = key(
        SHAKESPEARE_GPT_CPU_LANES="2", SHAKESPEARE_GPT_OPS="auto", SHAKESPEARE_GPT_PROGRESS="0"
    )
    assert key(SHAKESPEARE_GPT_PROGRESS="1") == base  # a progress bar changes no number
    assert key(SHAKESPEARE_GPT_CPU_LANES="1") != base  # dropout masks are drawn per lane
    assert key(SHAKESPEARE_GPT_CPU_LANES="2", SHAKESPEARE_GPT_OPS="reference") != base


@pytest.mark.slow
def test_editing_a_kernel_source_recomputes_only_the_stages_that_run_it(
    tmp_path, corpus_path, corpus_sha
):
    src = tmp_path / "src"
    for package in ("mlx_model", "tasks", "flows"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "SHAKESPEARE_GPT_PROGRESS": "0", "PYTHONPATH": str(src)}
    args = [sys.executable, "-m", "flows", "run", "--preset", "tiny", "--max-tokens", "20",
            "--artifacts", str(tmp_path / "artifacts"), "--source", str(corpus_path),
            "--sha256", corpus_sha]  # fmt: skip

    def run() -> dict[str, bool]:
        proc = subprocess.run(args, cwd=src, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.split("cached: ")[1].splitlines()[0])

    assert not any(run().values())
    kernels = src / KERNELS.relative_to(ROOT)
    kernels.write_text(kernels.read_text() + "\n// an edited comment\n")
    assert run() == {
        "download": True, "vocab": True, "tokenize": True,
        "train": False, "evaluate": False, "sample": False,
    }  # fmt: skip
