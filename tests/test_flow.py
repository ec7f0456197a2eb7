"""The end-to-end flow under prefect_test_harness: caching behaviour and stage reruns."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.pipeline import pipeline

STAGES = ["download", "vocab", "tokenize", "train", "evaluate", "sample"]


@pytest.fixture
def run(tmp_path, corpus_path, corpus_sha, prefect_harness):
    def _run(sampling=None, training=None, **params):
        overrides = {
            "source": {"source": corpus_path.as_uri(), "sha256": corpus_sha},
            "sampling": {"max_tokens": 40, **(sampling or {})},
            "training": training or {},
        }
        return pipeline("tiny", overrides, str(tmp_path / "artifacts"), **params)

    return _run


def recomputed(summary) -> list[str]:
    return [stage for stage, hit in summary["cached"].items() if not hit]


def test_end_to_end_then_caching(run, tmp_path):
    first = run()
    assert recomputed(first) == STAGES
    assert first["eval"]["val_loss"] < 4.0
    assert first["sample"].startswith("\n") and len(first["sample"]) == 41

    second = run()
    assert recomputed(second) == []  # all cache hits, no training
    assert second["sample"] == first["sample"]

    new_prompt = run(sampling={"prompt": "KING:", "temperature": 0.5})
    assert recomputed(new_prompt) == ["sample"]
    assert new_prompt["sample"].startswith("KING:")

    longer = run(training={"max_iters": 35})  # a different training config
    assert recomputed(longer) == ["train", "evaluate", "sample"]

    # a deleted artifact file makes its stage recompute instead of failing
    (tmp_path / "artifacts" / "evaluate").rename(tmp_path / "evaluate-moved")
    (Path(second["outputs"]["train"].path) / "best" / "model.safetensors").unlink()
    after_delete = run()
    assert "train" in recomputed(after_delete) and "evaluate" in recomputed(after_delete)
    assert after_delete["cached"]["tokenize"]


def test_until_and_force(run):
    run(until="tokenize")
    partial = run(until="vocab")
    assert list(partial["cached"]) == ["download", "vocab"]
    forced = run(until="tokenize", force=["tokenize"])
    assert recomputed(forced) == ["tokenize"]


def test_unknown_stage(run):
    with pytest.raises(ValueError, match="unknown stage 'smaple'"):
        run(until="smaple")
