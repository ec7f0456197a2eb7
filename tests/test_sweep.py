"""Sweeps: trials from a grid, mapped over a local Dask cluster, a leaderboard, the best trial."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mlx_model.checkpoint import STATE
from mlx_model.train import LATEST
from tasks.sweep import RECORD, SWEEPS, leaderboard_rows, parse_grid, trials
from tasks.train import METRICS


def test_grid_values_take_their_fields_types():
    grid = parse_grid(["learning_rate=1e-3,3e-3", "model.dropout=0,0.1", "top_k=none"][:2])
    assert grid == {"training.learning_rate": [1e-3, 3e-3], "model.dropout": [0.0, 0.1]}
    plan = trials("tiny", {}, grid)
    assert len(plan) == 4 and plan[0]["overrides"]["training"]["learning_rate"] == 1e-3
    assert len({p["name"] for p in plan}) == 4
    assert len(trials("tiny", {}, grid, samples=3, seed=1)) == 3
    joint = trials("tiny", {}, {"schedule": [{"learning_rate": 2e-3, "min_lr": 2e-4}]})
    assert joint[0]["overrides"]["training"] == {"learning_rate": 2e-3, "min_lr": 2e-4}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["lerning_rate=1e-3"], "unknown sweep field 'lerning_rate'"),
        (["learning_rate=fast"], "training.learning_rate must be float, got 'fast'"),
        (["learning_rate"], "--grid takes FIELD=VALUE"),
        (["model.n_head=3"], "n_emb (16) must be divisible by n_head (3)"),
    ],
)
def test_bad_grids_are_named_before_anything_runs(items, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trials("tiny", {}, parse_grid(items))


def test_leaderboard_sorts_finished_trials_and_keeps_failed_ones_last():
    def finished(name, loss):
        history = [{"step": 10, "val_loss": loss + 0.1}]
        metrics = {
            "best_val_loss": loss,
            "history": history,
            "final_step": 10,
            "tokens_per_sec": 1.0,
        }
        return {
            "name": name,
            "settings": {},
            "status": "completed",
            "val_loss": loss,
            "metrics": metrics,
        }

    failed = {"name": "x", "settings": {}, "status": "failed: boom"}
    rows = leaderboard_rows([finished("a", 2.0), failed, finished("b", 1.5)])
    assert [r["trial"] for r in rows] == ["b", "a", "x"]
    assert [r["rank"] for r in rows] == [1, 2, None] and rows[2]["status"] == "failed: boom"


def _sweep(corpus_path, corpus_sha, root, grid, workers=2, **training):
    from flows.sweep import dask_runner, sweep_pipeline

    overrides = {"source": {"source": str(corpus_path), "sha256": corpus_sha}}
    if training:
        overrides["training"] = training
    flow = sweep_pipeline.with_options(task_runner=dask_runner(workers=workers))
    return flow(
        preset="tiny", overrides=overrides, grid=grid, artifacts=str(root), return_state=True
    )


def _trained(root: Path) -> dict[str, int]:
    """meta.json modification times of every finished train stage."""
    return {str(m): m.stat().st_mtime_ns for m in root.glob("train/*/meta.json")}


@pytest.mark.slow
def test_a_sweep_trains_each_trial_once_and_ranks_them(
    corpus_path, corpus_sha, tmp_path, prefect_harness
):
    grid = {"training.learning_rate": [1e-3, 3e-3], "model.dropout": [0.0, 0.1]}
    state = _sweep(corpus_path, corpus_sha, tmp_path, grid)
    assert state.is_completed() and state.name == "Completed", state
    record = state.result()
    assert [t["status"] for t in record["trials"]] == ["completed"] * 4
    for stage in ("download", "vocab", "tokenize"):  # the data stages ran once
        assert len(list(tmp_path.glob(f"{stage}/*/meta.json"))) == 1
    first = _trained(tmp_path)
    assert len(first) == 4
    rows = leaderboard_rows(record["trials"])
    losses = [r["val_loss"] for r in rows]
    assert losses == sorted(losses) and len(rows) == 4
    best = min(record["trials"], key=lambda t: t["val_loss"])
    assert record["best"] == best["name"] == rows[0]["trial"]
    folder = tmp_path / SWEEPS / record["name"]
    assert (folder / RECORD).exists() and (folder / "validation_curves.png").stat().st_size > 5000
    # the best trial is what best-of:<sweep> evaluates and samples
    from flows.pipeline import pipeline

    source = {"source": str(corpus_path), "sha256": corpus_sha}
    summary = pipeline("tiny", {"source": source, "sampling": {"max_tokens": 10}},
                       str(tmp_path), model=f"best-of:{record['name']}")  # fmt: skip
    assert summary["outputs"]["train"].path == best["train"]["path"]
    assert summary["eval"]["val_loss"] == pytest.approx(best["val_loss"])
    # the same sweep again trains nothing; one more value trains only the new trials
    again = _sweep(corpus_path, corpus_sha, tmp_path, grid).result()
    assert _trained(tmp_path) == first and again["best"] == record["best"]
    more = _sweep(
        corpus_path, corpus_sha, tmp_path, {**grid, "training.learning_rate": [1e-3, 3e-3, 1e-2]}
    )
    after = _trained(tmp_path)
    assert len(after) == 6 and all(after[k] == v for k, v in first.items())
    assert len(more.result()["trials"]) == 6


@pytest.mark.slow
def test_a_failing_trial_is_a_failed_row_and_the_others_finish(
    corpus_path, corpus_sha, tmp_path, prefect_harness
):
    # a context longer than the validation split fails inside the train stage
    state = _sweep(corpus_path, corpus_sha, tmp_path, {"model.block_size": [16, 200_000]})
    assert state.is_completed() and state.name == "Completed with failed trials"
    assert "1 of 2 trials failed" in state.message and "block_size=200000" in state.message
    record = state.result()
    failed = [t for t in record["trials"] if t["status"] != "completed"]
    assert len(failed) == 1 and "shorter than block_size + 1 = 200001" in failed[0]["status"]
    assert record["best"] == "block_size=16"
    rows = leaderboard_rows(record["trials"])
    assert rows[-1]["status"].startswith("failed:") and rows[0]["rank"] == 1


def _worker_pids() -> list[int]:
    """The local Dask cluster's worker processes: children of this process that
    multiprocessing spawned."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"spawn_main" in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_a_killed_worker_fails_its_trial_and_the_others_finish(
    corpus_path, corpus_sha, tmp_path, prefect_harness
):
    """A worker process killed mid-trial: that trial is a failed row and its task run
    Crashed, the other trial finishes, nothing unfinished is marked finished, and the
    rerun trains the lost trial from its latest checkpoint."""
    from prefect import get_client

    grid = {"training.learning_rate": [1e-3, 3e-3]}
    long = {"max_iters": 3000, "checkpoint_interval": 50, "eval_interval": 1000}
    killed: list[int] = []
    environ: list[bytes] = []

    def kill_one_when_both_checkpointed():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if len(list(tmp_path.glob(f"train/*/{LATEST}/{STATE}"))) == 2:
                pids = _worker_pids()
                if len(pids) == 2:
                    environ.append((Path("/proc") / str(pids[0]) / "environ").read_bytes())
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_when_both_checkpointed, daemon=True)
    killer.start()
    state = _sweep(corpus_path, corpus_sha, tmp_path, grid, **long)
    killer.join(10)
    assert killed, "the two trials never both checkpointed while running"
    # the workers keep glibc's adaptive mmap threshold (Dask's default environment sets
    # MALLOC_TRIM_THRESHOLD_, which slowed MLX's steps)
    assert b"MALLOC_TRIM_THRESHOLD_" not in environ[0]
    assert state.is_completed() and state.name == "Completed with failed trials", state
    record = state.result()
    failed = [t for t in record["trials"] if t["status"] != "completed"]
    assert len(failed) == 1 and "KilledWorker" in failed[0]["status"]
    assert len(_trained(tmp_path)) == 1  # the lost trial's stage is not marked finished
    run_id = failed[0]["link"].rsplit("/", 1)[-1]
    with get_client(sync_client=True) as client:
        assert client.read_task_run(run_id).state.name == "Crashed"
    again = _sweep(corpus_path, corpus_sha, tmp_path, grid, **long)
    assert again.name == "Completed", again
    assert len(_trained(tmp_path)) == 2
    lost = next(t for t in again.result()["trials"] if t["name"] == failed[0]["name"])
    metrics = json.loads((Path(lost["train"]["path"]) / METRICS).read_text())
    assert metrics["resumed_from"] and metrics["resumed_from"] % 50 == 0
