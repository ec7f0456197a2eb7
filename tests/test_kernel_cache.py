"""MLX's kernel cache under the user's cache folder, shared safely by processes, and the
switch from uncompiled to compiled steps that a cold cache uses (issue: GPU cold start).

No GPU here: the cache's files are written by the tests as MLX writes them (`.ptx`, then
`.txt`, then `.cu`), and the warm-up child runs on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mlx_model.runtime import kernel_cache as kc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """No kernel cache installed, the user's cache folder under tmp_path."""
    monkeypatch.setattr(kc, "_ACTIVE", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for name in (kc.ENV, kc.SHARED_ENV):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    if kc._ACTIVE is not None:
        kc._ACTIVE.close()
    for name in (kc.ENV, kc.SHARED_ENV):  # install() may have set them for children
        os.environ.pop(name, None)


def write_module(folder: Path, name: str, body: bytes) -> None:
    """A module as MLX writes it (jit_module.cpp's write_cached_ptx)."""
    (folder / f"{name}.ptx").write_bytes(body)
    (folder / f"{name}.txt").write_text(f"{name}_kernel\tmangled_{name}\n")
    (folder / f"{name}.cu").write_text("// source\n")


def test_the_cache_lives_under_the_users_cache_folder_per_mlx_version(fresh_cache):
    env: dict[str, str] = {}
    cache = kc.install("9.9.9", env)
    shared = fresh_cache / "xdg" / "shakespeare-gpt" / "mlx-kernels" / "9.9.9"
    assert cache.shared == shared
    private = Path(env[kc.ENV])
    assert private.parent == shared / kc.STAGING and private.is_dir()
    assert cache.cold and "cold" in cache.describe()


def test_a_users_own_cache_folder_is_the_shared_one(fresh_cache):
    own = fresh_cache / "mine"
    own.mkdir()
    write_module(own, "fused_a", b"x")
    env = {kc.ENV: str(own)}
    cache = kc.install("9.9.9", env)
    assert cache.shared == own and Path(env[kc.ENV]).parent == own / kc.STAGING
    assert cache.modules_at_start == 1 and not cache.cold
    assert (Path(env[kc.ENV]) / "fused_a.ptx").read_bytes() == b"x"


def test_modules_travel_whole_between_private_and_shared_folders(fresh_cache):
    cache = kc.install("9.9.9", {})
    write_module(cache.private, "fused_a", b"A" * 1000)
    assert cache.publish() == 1 and cache.publish() == 0
    shared = cache.shared
    assert (shared / "fused_a.ptx").read_bytes() == b"A" * 1000
    assert (shared / "fused_a.txt").read_text().startswith("fused_a_kernel")
    assert not list(shared.glob(".tmp-*"))
    # a second process starts warm, with the module copied into its own folder
    monkey_env: dict[str, str] = {}
    kc._ACTIVE = None
    second = kc.install("9.9.9", monkey_env)
    assert second.private != cache.private and second.modules_at_start == 1
    assert (second.private / "fused_a.ptx").read_bytes() == b"A" * 1000
    second.close()
    assert not second.private.exists()


def test_a_child_process_takes_a_private_folder_of_its_own(fresh_cache):
    env: dict[str, str] = {}
    parent = kc.install("9.9.9", env)
    kc._ACTIVE = None
    child_env = dict(env)  # what a child process inherits
    child = kc.install("9.9.9", child_env)
    assert child.shared == parent.shared
    assert child.private is not None and child.private != parent.private
    assert child_env[kc.ENV] == str(child.private)
    child.close()


def test_folders_of_processes_that_died_are_removed(fresh_cache):
    kc.install("9.9.9", {})
    staging = kc._ACTIVE.shared / kc.STAGING
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = staging / f"{kc.socket.gethostname()}-{dead.pid}-abc"
    stale.mkdir()
    kc._ACTIVE = None
    kc.install("9.9.9", {})
    assert not stale.exists()
    assert kc._ACTIVE.private.exists()


PUBLISHER = textwrap.dedent(
    """
    import os, sys, time
    from mlx_model.runtime import kernel_cache as kc
    cache = kc.install("9.9.9")
    for i in range(int(sys.argv[1])):
        name = f"fused_{i}"
        body = (name.encode() * 50000)[:400000]
        with open(cache.private / f"{name}.ptx", "wb") as f:  # in place, as MLX writes
            for k in range(0, len(body), 50000):
                f.write(body[k:k + 50000]); f.flush()
        (cache.private / f"{name}.txt").write_text(f"{name}\\tm\\n")
        cache.publish()
    """
)


def test_processes_filling_the_cache_at_once_never_expose_a_torn_module(fresh_cache):
    """Four processes compile the same 12 modules and publish them while a reader checks
    every module it finds in the shared folder: each is whole, with its kernel names."""
    env = {**os.environ, "XDG_CACHE_HOME": str(fresh_cache / "xdg")}
    env.pop(kc.ENV, None)
    procs = [
        subprocess.Popen([sys.executable, "-c", PUBLISHER, "12"], env=env, cwd=ROOT)
        for _ in range(4)
    ]
    shared = kc.default_shared("9.9.9")
    seen: dict[str, bytes] = {}
    while any(p.poll() is None for p in procs) or len(seen) < 12:
        for ptx in shared.glob("fused_*.ptx"):
            body = ptx.read_bytes()
            assert body == (ptx.stem.encode() * 50000)[:400000], f"torn {ptx.name}"
            assert (shared / f"{ptx.stem}.txt").read_text() == f"{ptx.stem}\tm\n"
            seen[ptx.stem] = body
        if all(p.poll() is not None for p in procs):
            break
    assert [p.wait() for p in procs] == [0, 0, 0, 0]
    assert kc.count_modules(shared) == 12 and len(seen) == 12
    assert not list((shared / kc.STAGING).iterdir())  # every private folder removed at exit


# --- the switch from uncompiled to compiled steps -------------------------------------


def _tiny(max_iters=12):
    from mlx_model.config import get_preset

    preset = get_preset("tiny")
    tc = preset.train.replace(max_iters=max_iters, eval_interval=4, checkpoint_interval=4)
    return preset.model.replace(vocab_size=65), tc


def _ids(n=4000):
    return np.random.default_rng(0).integers(0, 65, n).astype(np.uint8)


def _losses(result):
    return [r["train_loss"] for r in result.train_log] + [h["val_loss"] for h in result.history]


def test_uncompiled_steps_then_compiled_ones_give_the_compiled_runs_losses(tmp_path):
    from mlx_model.train import train

    cfg, tc = _tiny()
    tc = tc.replace(log_interval=1)
    ids, val = _ids(), _ids(1000)
    compiled = train(cfg, tc, ids, val, tmp_path / "a", compile_now=lambda: True)
    switch = iter([False] * 5 + [True] * 100)
    mixed = train(cfg, tc, ids, val, tmp_path / "b", compile_now=lambda: next(switch))
    eager = train(cfg, tc, ids, val, tmp_path / "c", compile_now=lambda: False)
    assert compiled.compiled_from == 0 and mixed.compiled_from == 5 and eager.compiled_from is None
    np.testing.assert_allclose(_losses(mixed), _losses(compiled), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(_losses(eager), _losses(compiled), rtol=2e-5, atol=2e-5)


class FakeWarmup:
    """A warm-up child whose two stages end at given steps of the run (counted in calls:
    the run asks once a step)."""

    failed = None

    def __init__(self, eager_at: int, done_at: int):
        self.eager_at, self.done_at, self.calls = eager_at, done_at, {"eager": 0, "done": 0}

    def _after(self, what: str, at: int) -> bool:
        self.calls[what] += 1
        return self.calls[what] > at

    def eager_ready(self) -> bool:
        return self._after("eager", self.eager_at)

    def ready(self) -> bool:
        return self._after("done", self.done_at)

    def close(self) -> None:
        pass


def test_uncompiled_steps_run_plain_then_with_mlxs_layers_compiled_then_compiled(
    tmp_path, monkeypatch
):
    """With a warm-up child: op by op with MLX's compilation off until its first stage is
    cached (step 3 here), then with MLX's own compiled layers, then the compiled step
    (step 7); the losses are the compiled run's within float rounding."""
    from mlx_model import warmup
    from mlx_model.train import train

    cfg, tc = _tiny()
    tc = tc.replace(log_interval=1)
    ids, val = _ids(), _ids(1000)
    compiled = train(cfg, tc, ids, val, tmp_path / "a", compile_now=lambda: True)
    monkeypatch.setattr(warmup, "start", lambda *args: FakeWarmup(eager_at=3, done_at=7))
    import mlx.core as mx

    turned_off, real_off = [], mx.disable_compile
    monkeypatch.setattr(mx, "disable_compile", lambda: (turned_off.append(1), real_off())[1])
    staged = train(cfg, tc, ids, val, tmp_path / "b")
    assert (staged.layers_from, staged.compiled_from) == (3, 7)
    assert len(turned_off) == 3  # steps 0 to 2; the estimate at step 4 came after the stage
    assert compiled.layers_from is None  # no warm-up: nothing to wait for
    np.testing.assert_allclose(_losses(staged), _losses(compiled), rtol=2e-5, atol=2e-5)


def test_a_run_resumed_after_the_switch_continues_exactly(tmp_path):
    from mlx_model.train import train

    cfg, tc = _tiny()
    ids, val = _ids(), _ids(1000)

    def after(n):
        calls = iter([False] * n + [True] * 1000)
        return lambda: next(calls)

    whole = train(cfg, tc, ids, val, tmp_path / "a", compile_now=after(3))
    train(cfg, tc, ids, val, tmp_path / "b", compile_now=after(3), stop_after=8)
    resumed = train(cfg, tc, ids, val, tmp_path / "b", compile_now=lambda: True)
    assert resumed.resumed_from == 8 and resumed.compiled_from == 8

    def numbers(result):
        return [(h["step"], h["train_loss"], h["val_loss"]) for h in result.history]

    assert numbers(resumed) == numbers(whole)


def test_a_cold_cache_starts_a_warm_up_child_and_the_next_run_finds_it_warm(
    fresh_cache, monkeypatch
):
    """The warm-up child compiles the step on the CPU here (no NVRTC) and records the
    configuration as warm in the shared cache (the test waits for it, so the run switches
    at its first step); a second run of the same configuration starts no child."""
    from mlx_model import warmup
    from mlx_model.train import train

    cache = kc.install("9.9.9")  # sets MLX_PTX_CACHE_DIR and the shared folder for children
    started = []
    real_start = warmup.start

    def start_and_wait(*args):
        started.append(real_start(*args))
        if started[-1] is not None:
            started[-1].proc.wait(timeout=120)
        return started[-1]

    monkeypatch.setattr(warmup, "start", start_and_wait)
    cfg, tc = _tiny()
    first = train(cfg, tc, _ids(), _ids(1000), fresh_cache / "a")
    assert started[0] is not None and started[0].proc.returncode == 0
    assert started[0].failed is None and first.compiled_from == 0
    sig = {**warmup.signature(cfg, tc, _ops_signature(tc)), "world_size": 1}
    assert cache.is_warm(sig) and cache.is_warm(warmup.eager_signature(sig))  # both stages
    second = train(cfg, tc, _ids(), _ids(1000), fresh_cache / "b")
    assert started[1] is None and second.compiled_from == 0
    assert second.best_val_loss == pytest.approx(first.best_val_loss, rel=1e-4)


def _ops_signature(tc):
    from mlx_model import ops

    return ops.signature(tc.compute_dtype)


def test_no_warm_up_without_a_kernel_cache_or_when_turned_off(fresh_cache, monkeypatch):
    from mlx_model import warmup

    cfg, tc = _tiny()
    sig = {"any": 1}
    assert kc.active() is None and warmup.start(cfg, tc, sig) is None
    kc.install("9.9.9", {})
    monkeypatch.setenv(warmup.ENV, "0")
    assert warmup.start(cfg, tc, sig) is None


def test_a_second_warm_up_of_the_same_configuration_waits_for_the_first(fresh_cache):
    """While one warm-up holds the configuration's lock, another waits (it does not
    compile the same kernels beside it) and ends once the first has recorded them."""
    import time

    from mlx_model import warmup

    cache = kc.install("9.9.9")
    cfg, tc = _tiny()
    sig = {**warmup.signature(cfg, tc, _ops_signature(tc)), "world_size": 1}
    with cache.lock(sig):
        second = warmup.start(cfg, tc, sig)
        time.sleep(3)
        assert not second.ready()  # blocked on the lock
        cache.mark_warm(sig)
    second.proc.wait(timeout=60)
    assert not second.log.exists()  # a child that succeeds removes its own log
    assert second.ready() and second.failed is None and second.proc.returncode == 0


def test_turning_compilation_off_for_a_call_keeps_the_users_setting(monkeypatch):
    """MLX_DISABLE_COMPILE=1 stays in force: the helper that turns compilation off for
    an uncompiled call must not turn it back on after."""
    import mlx.core as mx

    from mlx_model.ops import op_by_op

    calls = []
    monkeypatch.setattr(mx, "disable_compile", lambda: calls.append("off"))
    monkeypatch.setattr(mx, "enable_compile", lambda: calls.append("on"))
    wrapped = op_by_op(lambda x: x + 1)
    assert wrapped(1) == 2 and calls == ["off", "on"]
    monkeypatch.setenv("MLX_DISABLE_COMPILE", "1")
    assert wrapped(1) == 2 and calls == ["off", "on"]  # nothing turned on


def test_while_cudnn_attention_builds_a_second_child_compiles_its_step_beside_the_first(
    fresh_cache, monkeypatch
):
    """A run computing attention with MLX's operations while cuDNN's builds starts two
    children: one for its own step (the one it waits for), one that waits for the build
    and compiles the step with cuDNN's attention for the next runs, at the same time."""
    import io
    import json

    from mlx_model import warmup
    from mlx_model.ops import cuda

    jobs = []

    class Recorder:
        def __init__(self, command, stdin, **kwargs):
            self.stdin = io.BytesIO()
            self.stdin.close = lambda: jobs.append(json.loads(self.stdin.getvalue()))

    monkeypatch.setattr(warmup.subprocess, "Popen", Recorder)
    kc.install("9.9.9")
    cfg, tc = _tiny()
    sig = {"ops": {"attention": "mlx"}, "world_size": 1}
    monkeypatch.setattr(cuda, "building", lambda: True)
    started = warmup.start(cfg, tc, sig)
    assert [job.get("cudnn", False) for job in jobs] == [False, True]
    assert all(job["signature"] == sig for job in jobs)
    assert str(started.log) == jobs[0]["log"] != jobs[1]["log"]
    jobs.clear()
    monkeypatch.setattr(cuda, "building", lambda: False)  # cuDNN built, or not to be
    warmup.start(cfg, tc, sig)
    assert [job.get("cudnn", False) for job in jobs] == [False]


def test_a_childs_log_is_removed_kept_where_asked_and_kept_as_failed(tmp_path, monkeypatch):
    """A child that succeeds removes its log, or moves it where SHAKESPEARE_GPT_WARMUP_LOGS
    says (a benchmark reads where the time went); the second child, whose log no run
    reads, keeps it named as failed when it fails, and the traceback still reaches it."""
    import io
    import json

    from mlx_model import warmup

    cfg, tc = _tiny()
    log = tmp_path / "1-a.log"
    job = {"model": cfg.to_dict(), "training": tc.to_dict(), "signature": {}, "log": str(log)}
    monkeypatch.setattr(warmup.kernel_cache, "active", lambda: object())
    monkeypatch.setattr(warmup, "_compile_into", lambda *args: None)

    def run(**extra):
        log.write_text("warm-up mlx: compiled step's kernels at 1.0 s\n")
        monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({**job, **extra})))
        return warmup.main()

    monkeypatch.delenv(warmup.LOGS_ENV, raising=False)
    assert run() == 0 and not log.exists()
    monkeypatch.setenv(warmup.LOGS_ENV, str(tmp_path / "kept"))
    assert run() == 0 and "1.0 s" in (tmp_path / "kept" / "1-a.log").read_text()

    def fail(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(warmup, "_cudnn_step", fail)
    monkeypatch.delenv(warmup.LOGS_ENV)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(cudnn=True)
    assert not log.exists() and (tmp_path / "1-a.log.failed").exists()


def test_a_warm_marker_names_the_code_that_wrote_it(tmp_path):
    """The marker's signature carries the package's source digest: after an edit (an
    upgrade), the cache is not taken as warm for the changed step."""
    import shutil

    from mlx_model import warmup
    from mlx_model.config import TINY

    same, edited = tmp_path / "same" / "mlx_model", tmp_path / "edited" / "mlx_model"
    for copy in (same, edited):
        shutil.copytree(Path(warmup.__file__).parent, copy, ignore=shutil.ignore_patterns("*.pyc"))
    (edited / "optimizer.py").write_text((edited / "optimizer.py").read_text() + "# edited\n")
    assert warmup.code_digest(same) == warmup.code_digest()
    assert warmup.code_digest(edited) != warmup.code_digest()
    assert warmup.signature(TINY.model, TINY.train, {})["code"] == warmup.code_digest()
    cache = kc.KernelCache(tmp_path / "shared", tmp_path / "private", 0)
    sig = warmup.signature(TINY.model, TINY.train, {})
    cache.mark_warm(sig)
    assert cache.is_warm(sig) and not cache.is_warm({**sig, "code": warmup.code_digest(edited)})


def test_a_module_named_to_the_file_systems_limit_is_published(fresh_cache):
    """MLX names a fused kernel after its ops; one of nanogpt-char-fast's step with cuDNN
    attention ran to 240 characters, and a temporary name built on it failed to open."""
    cache = kc.install("9.9.9", {})
    name = "fused_" + "BroadcastMultiplyAsType" * 10  # 236 characters, 240 with ".ptx"
    write_module(cache.private, name, b"P" * 10)
    assert cache.publish() == 1
    assert (cache.shared / f"{name}.ptx").read_bytes() == b"P" * 10


def test_a_failed_warm_up_is_read_once_and_asked_again_without_error(tmp_path, monkeypatch):
    """The run asks whether its warm-up is done at each estimate and at its end; a child
    that failed is reported once, and its log gone (moved by the child, or read and
    removed) breaks no later question. (A run ended with FileNotFoundError so.)"""
    import subprocess

    from mlx_model import warmup

    cache = kc.KernelCache(tmp_path / "shared", tmp_path / "private", 0)
    log = tmp_path / "child.log"
    log.write_text("Traceback ...\nOSError: the reason\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    child = warmup.Warmup(proc, cache, log, {"model": {}})
    assert child.ready() and child.failed.endswith("OSError: the reason\n")
    assert not log.exists()
    assert child.ready() and child.close() is False
    moved = warmup.Warmup(proc, cache, tmp_path / "moved-away.log", {"model": {}})
    assert moved.ready() and moved.failed == "exit code 3"


def test_a_warm_configurations_step_runs_once_ahead_and_leaves_the_run_unchanged(
    fresh_cache, monkeypatch
):
    """`warm_process` (the CLI runs it while Prefect's server boots) runs the compiled
    step once, on the run's batch shape, only where the cache records the configuration
    as warm; a run after it trains to exactly the losses of a run without it."""
    from mlx_model import warmup
    from mlx_model.train import train

    cfg, tc = _tiny()
    runs = []
    real = warmup.compile_kernels
    monkeypatch.setattr(warmup, "compile_kernels", lambda *a, **k: runs.append(k) or real(*a, **k))
    assert not warmup.warm_process(cfg, tc)  # no kernel cache: a CPU process
    cache = kc.install("9.9.9")
    assert not warmup.warm_process(cfg, tc) and runs == []  # cold: the warm-up child's job
    monkeypatch.setenv(warmup.ENV, "0")  # no warm-up child for the runs below
    without = train(cfg, tc, _ids(), _ids(1000), fresh_cache / "a")
    cache.mark_warm(warmup.run_signature(cfg, tc))
    assert not warmup.warm_process(cfg, tc.replace(batch_size=4)) and runs == []  # not warm
    assert warmup.warm_process(cfg, tc) and runs == [{"windows": tc.batch_size}]
    after = train(cfg, tc, _ids(), _ids(1000), fresh_cache / "b")
    assert after.compiled_from == without.compiled_from == 0
    assert _losses(after) == _losses(without)


def test_the_step_runs_ahead_for_a_run_of_one_process_only(monkeypatch):
    """`prepare_device` (the CLI's, while the server boots) hands the run's settings to
    `warm_process` only for one process: mlx.launch's ranks train elsewhere."""
    import tasks.train
    from mlx_model import warmup
    from mlx_model.config import ParallelConfig

    ran = []
    monkeypatch.setattr(warmup, "warm_process", lambda cfg, tc: ran.append(tc) or True)
    cfg, tc = _tiny()
    assert tasks.train.prepare_device(cfg, tc, ParallelConfig()) and ran == [tc]
    assert not tasks.train.prepare_device(cfg, tc, ParallelConfig(processes=2))
    assert not tasks.train.prepare_device() and ran == [tc]
