"""Real faults, injected: kill -9 mid-training and mid-write, flipped bytes, a flaky
download server, two runs at once on one artifact root, and the Prefect API going away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from server import PrefectServer

from mlx_model.data import file_sha256
from tasks.download import SourceConfig, TransientDownloadError, download_corpus
from tasks.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "flows"]
pytestmark = pytest.mark.slow


def tiny(artifacts: Path, corpus_path: Path, corpus_sha: str, *extra: str) -> list[str]:
    return [
        "--preset", "tiny", "--artifacts", str(artifacts), "--source", str(corpus_path),
        "--sha256", corpus_sha, "--max-tokens", "40", *extra,
    ]  # fmt: skip


def start(server: PrefectServer, *args: str) -> subprocess.Popen:
    env = {**server.env(), "SHAKESPEARE_GPT_PROGRESS": "0"}
    return subprocess.Popen(
        [*CLI, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended before {what}: {out[-2000:]} {err[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_step(artifacts: Path) -> int:
    """The step of the newest complete resumable checkpoint of the train stage, or 0."""
    for state in artifacts.glob("train/*/latest/state.json"):
        try:
            return json.loads(state.read_text())["step"]
        except (OSError, ValueError):
            return 0  # being replaced right now
    return 0


def metrics(artifacts: Path) -> dict:
    (path,) = artifacts.glob("train/*/metrics.json")
    return json.loads(path.read_text())


def test_kill_9_mid_training_then_rerun_resumes_with_the_same_losses(
    prefect_server, tmp_path, corpus_path, corpus_sha
):
    steps = ["--max-iters", "400"]
    reference = tmp_path / "uninterrupted"
    finish(
        start(prefect_server, "stage", "train", *tiny(reference, corpus_path, corpus_sha, *steps))
    )

    killed = tmp_path / "killed"
    proc = start(prefect_server, "stage", "train", *tiny(killed, corpus_path, corpus_sha, *steps))
    at = wait_for(lambda: checkpoint_step(killed) >= 100, 240, "a checkpoint at step 100", proc)
    at = checkpoint_step(killed) or at
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert at < 400, "the run finished before it could be killed"
    assert not list(killed.glob("train/*/meta.json"))  # the stage is not marked finished
    assert not list(killed.glob("runs/*/manifest.json"))  # nor the run

    finish(start(prefect_server, "stage", "train", *tiny(killed, corpus_path, corpus_sha, *steps)))
    resumed, full = metrics(killed), metrics(reference)
    # resumes from the newest checkpoint seen before the kill (or a later one), so at most one
    # checkpoint interval (10 steps for tiny) of work is lost
    assert resumed["resumed_from"] is not None and resumed["resumed_from"] >= at
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in full["history"]]
    assert [h["train_loss"] for h in resumed["history"]] == [
        h["train_loss"] for h in full["history"]
    ]
    (a,) = killed.glob("train/*/best/model.safetensors")
    (b,) = reference.glob("train/*/best/model.safetensors")
    assert file_sha256(a) == file_sha256(b)


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mlx_model.files import atomic_path
    from tasks.store import ArtifactStore

    target, ready, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def slow_write(path):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(b"new" * 1_000_000)
            f.flush()
            ready.touch()
            time.sleep(120)  # killed here, halfway through

    if mode == "file":
        slow_write(target)
    else:
        def compute(directory):
            (directory / "a.txt").write_text("complete")
            slow_write(directory / "b.bin")
            return {}
        ArtifactStore(target).run("stage", {"x": 1}, compute, ["a.txt", "b.bin"])
    """
)


def kill_while_writing(tmp_path: Path, target: Path, mode: str) -> None:
    ready = tmp_path / f"ready-{mode}"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(ready), mode], cwd=ROOT)
    wait_for(ready.exists, 60, "the writer to start", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_during_a_write_never_exposes_a_partial_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old, complete")
    kill_while_writing(tmp_path, target, "file")
    assert target.read_bytes() == b"old, complete"  # the old version, whole
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")]
    assert leftovers and all(".tmp" in name for name in leftovers)  # only a temporary name

    root = tmp_path / "artifacts"
    kill_while_writing(tmp_path, root, "stage")
    store = ArtifactStore(root)
    assert store.lookup("stage", _key(store)) is None  # no meta.json: never read as finished

    def compute(directory):
        (directory / "a.txt").write_text("complete")
        (directory / "b.bin").write_bytes(b"whole")
        return {}

    out = store.run("stage", {"x": 1}, compute, ["a.txt", "b.bin"])
    assert not out.cached and Path(out.path, "b.bin").read_bytes() == b"whole"
    assert store.lookup("stage", _key(store)) is not None


def _key(store: ArtifactStore) -> str:
    from tasks.store import digest_json

    return digest_json({"stage": "stage", "x": 1})


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_tokens_and_checkpoint_are_detected_and_recomputed(
    tmp_path, corpus_path, corpus_sha, prefect_harness, caplog
):
    from flows.pipeline import pipeline

    overrides = {
        "source": {"source": str(corpus_path), "sha256": corpus_sha},
        "sampling": {"max_tokens": 20},
    }
    params = dict(preset="tiny", artifacts=str(tmp_path), overrides=overrides)
    first = pipeline(**params)
    arrow = Path(first["outputs"]["tokenize"].path) / "train.arrow"
    weights = Path(first["outputs"]["train"].path) / "best" / "model.safetensors"
    flip_byte(arrow)
    flip_byte(weights)
    with caplog.at_level("WARNING"):
        second = pipeline(**params)
    assert f"{arrow} does not match its recorded digest" in caplog.text
    assert f"{weights} does not match its recorded digest" in caplog.text
    assert second["cached"]["tokenize"] is False and second["cached"]["train"] is False
    # recomputed deterministically: the same bytes as before the damage, so downstream
    # stages (keyed on those digests) are still valid and reused
    assert file_sha256(arrow) == recorded_digest(first, "tokenize", "train.arrow")
    assert file_sha256(weights) == recorded_digest(first, "train", "best/model.safetensors")
    assert second["cached"]["evaluate"] is True


def recorded_digest(summary, stage: str, name: str) -> str:
    meta = json.loads((Path(summary["outputs"][stage].path) / "meta.json").read_text())
    return meta["files"][name]


def test_download_faults_retry_or_fail_clearly_keeping_nothing(
    http_server, corpus_sha, tmp_path, prefect_harness
):
    url, handler = http_server
    # a 500, then a truncated body, then the real thing: retried through to success
    handler.plan = ["500", "truncate"]
    out = download_corpus(ArtifactStore(tmp_path / "a"), SourceConfig(url, corpus_sha))
    assert handler.requests == 3 and file_sha256(Path(out.path) / "input.txt") == corpus_sha
    # a wrong body: not retried (it would not help), named, and nothing kept
    handler.plan, handler.requests = ["corrupt"], 0
    with pytest.raises(ValueError, match=f"expected sha256 {corpus_sha}"):
        download_corpus(ArtifactStore(tmp_path / "b"), SourceConfig(url, corpus_sha))
    assert handler.requests == 1
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file() and "input" in p.name]
    # connection refused: retried, then a clear error; nothing kept
    closed = "http://127.0.0.1:9/input.txt"
    with pytest.raises(TransientDownloadError, match="127.0.0.1:9/input.txt is unreachable"):
        download_corpus(ArtifactStore(tmp_path / "c"), SourceConfig(closed, corpus_sha))
    assert not list((tmp_path / "c").glob("download/*/meta.json"))
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file() and "input" in p.name]


def test_two_runs_at_once_on_one_artifact_root(prefect_server, tmp_path, corpus_path, corpus_sha):
    root = tmp_path / "shared"
    same = [start(prefect_server, "run", *tiny(root, corpus_path, corpus_sha)) for _ in range(2)]
    other = start(prefect_server, "run", *tiny(root, corpus_path, corpus_sha, "--prompt", "KING"))
    outs = [finish(p) for p in [*same, other]]
    samples = [o.split("----- sample -----\n")[1].split("----- validation")[0] for o in outs]
    assert samples[0] == samples[1] and samples[2].startswith("KING")
    # every stage was computed once and every stored file still matches its digest
    store = ArtifactStore(root)
    for stage in ("download", "vocab", "tokenize", "train", "evaluate"):
        (directory,) = root.glob(f"{stage}/*/meta.json")
        meta = json.loads(directory.read_text())
        assert store.lookup(stage, meta["key"]) is not None
    assert len(list(root.glob("sample/*/meta.json"))) == 2
    assert not list(root.rglob("*.tmp*"))  # no stray temporary files either
    assert len(list(root.glob("runs/*/manifest.json"))) == 3


def test_prefect_api_going_away_mid_run(tmp_path, corpus_path, corpus_sha, prefect_server):
    doomed = PrefectServer(tmp_path / "doomed-server").start()
    artifacts = tmp_path / "artifacts"
    args = tiny(artifacts, corpus_path, corpus_sha, "--max-iters", "600")
    proc = start(doomed, "run", *args)
    try:
        wait_for(lambda: checkpoint_step(artifacts) >= 20, 240, "training to start", proc)
    finally:
        doomed.stop()  # the API goes away while the train stage runs
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 3, out[-2000:] + err[-3000:]
    assert f"the Prefect API at {doomed.api_url} is not answering" in err
    assert "Stages that finished are kept" in err
    # what was finished is intact and verified; the rerun (another server) reuses it
    store = ArtifactStore(artifacts)
    for stage in ("download", "vocab", "tokenize"):
        (meta,) = artifacts.glob(f"{stage}/*/meta.json")
        assert store.lookup(stage, json.loads(meta.read_text())["key"]) is not None
    rerun = finish(start(prefect_server, "run", *args))
    cached = json.loads(rerun.split("cached: ")[1].splitlines()[0])
    assert cached["download"] and cached["vocab"] and cached["tokenize"]
    m = metrics(artifacts)
    assert cached["train"] or m["resumed_from"] is not None  # finished, or resumed: not redone


def test_an_artifact_root_removed_by_a_concurrent_check_is_created_again(tmp_path, monkeypatch):
    """Two runs started together both create a missing root to probe it, and each removes
    what it created: the one whose folder vanished before its probe creates it again."""
    from tasks import preflight

    root = tmp_path / "shared"
    real, calls = preflight.tempfile.mkdtemp, []

    def other_run_removed_it(**kwargs):
        calls.append(kwargs["dir"])
        if len(calls) == 1:
            root.rmdir()  # what the other run's cleanup does
        return real(**kwargs)

    monkeypatch.setattr(preflight.tempfile, "mkdtemp", other_run_removed_it)
    preflight.check_writable_folder(root, "artifact root")
    assert len(calls) == 2 and not root.exists()  # probed twice; cleaned up as before
