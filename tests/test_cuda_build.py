"""Where cuDNN attention's build finds its headers and libraries (`mlx_model.ops.cuda`), and
that without a GPU nothing is built or used. The build itself and the kernel run on a GPU
only (tests/test_cuda_attention.py)."""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_model import ops
from mlx_model.config import TINY, ParallelConfig
from mlx_model.ops import cuda

TINY_CFG = TINY.model.replace(vocab_size=65)


def _touch(root: Path, *relative: str) -> None:
    for rel in relative:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")


@pytest.fixture
def mlx_include(tmp_path):
    root = tmp_path / "mlx" / "include"
    _touch(root, "mlx/backend/cuda/device.h", "cccl/nv/target")
    return root


def test_pips_cuda_and_cudnn_packages_are_found(tmp_path, mlx_include):
    nvidia = tmp_path / "site" / "nvidia"
    _touch(nvidia, "cu13/include/cuda_runtime_api.h", "cu13/include/crt/host_defines.h")
    _touch(nvidia, "cu13/lib/libcudart.so.13", "cudnn/include/cudnn.h")
    frontend = tmp_path / "site" / "include"
    _touch(frontend, "cudnn_frontend.h")
    found = cuda.find_inputs([nvidia], [], mlx_include, frontend)
    flags, link = cuda.build_flags(found)
    for folder in (frontend, nvidia / "cudnn/include", nvidia / "cu13/include"):
        assert f"-I{folder}" in flags
    assert flags.count(f"-I{nvidia / 'cu13/include'}") == 1  # runtime and crt share it
    assert f"-I{mlx_include / 'cccl'}" in flags
    assert f"-I{cuda.CSRC / 'fmt_shim'}" in flags
    assert link == [str(nvidia / "cu13/lib/libcudart.so.13"), f"-Wl,-rpath,{nvidia / 'cu13/lib'}"]


def test_a_cuda_toolkit_stands_in_for_pips_packages(tmp_path, mlx_include):
    home = tmp_path / "cuda" / "targets" / "x86_64-linux"
    _touch(home, "include/cuda_runtime_api.h", "include/crt/host_defines.h", "lib/libcudart.so.13")
    nvidia = tmp_path / "site" / "nvidia"
    _touch(nvidia, "cudnn/include/cudnn.h")
    frontend = tmp_path / "fe"
    _touch(frontend, "cudnn_frontend.h")
    found = cuda.find_inputs([nvidia], [tmp_path / "cuda", home], mlx_include, frontend)
    assert found[f"libcudart.so.{cuda.CUDA_MAJOR}"] == home / "lib"
    assert found["cuda_runtime_api.h"] == home / "include"


def test_what_is_missing_is_named_with_the_package_that_brings_it(tmp_path, mlx_include):
    nvidia = tmp_path / "site" / "nvidia"
    _touch(nvidia, "cu13/include/cuda_runtime_api.h", "cu13/lib/libcudart.so.13")
    _touch(nvidia, "cudnn/include/cudnn.h")
    with pytest.raises(cuda.BuildError) as err:
        cuda.find_inputs([nvidia], [], mlx_include, None)
    assert str(err.value) == (
        "not found: cuDNN's frontend headers (pip install nvidia-cudnn-frontend), "
        "crt/host_defines.h (pip install nvidia-cuda-crt)"
    )


def test_without_a_gpu_nothing_is_built_or_used():
    assert not cuda.usable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even the warning a failed build gives
        assert cuda.load() is None
    assert not cuda.needs_build()
    assert not ops.cuda_build_pending("bfloat16")
    with ops.use("gpu"):
        assert ops.signature("bfloat16")["attention"] == "mlx"
        qkv = mx.random.normal((2, 8, 3 * 16)).astype(mx.bfloat16)
        y = ops.causal_attention(qkv, 2, 0.1, True)  # MLX's operations, dropout included
    assert y.shape == (2, 8, 16)


class _Popen:
    """Records the background build's command instead of starting it."""

    calls: list[list[str]] = []

    def __init__(self, command, **kwargs):
        _Popen.calls.append(command)


@pytest.fixture
def gpu_like(tmp_path, monkeypatch):
    """A process that looks as if it ran on an NVIDIA GPU with the build's inputs present:
    the library goes to tmp_path; nothing is compiled or started."""
    lib = tmp_path / "cache" / "_cuda_attention-abc.so"
    lib.parent.mkdir()
    monkeypatch.setattr(cuda, "usable", lambda: True)
    monkeypatch.setattr(cuda, "_planned", lambda: (lib, None))
    monkeypatch.setattr(cuda.subprocess, "Popen", _Popen)
    monkeypatch.setattr(cuda, "_build_started", False)
    monkeypatch.setenv(cuda.ENV, "auto")  # and restored afterwards, as the choice pins it
    _Popen.calls = []
    cuda._auto.cache_clear()
    yield lib
    cuda._auto.cache_clear()


def test_auto_without_the_library_builds_it_in_the_background_and_runs_mlx(gpu_like):
    assert cuda.for_run() is None
    assert _Popen.calls == [[sys.executable, "-m", "mlx_model.ops.cuda"]]
    assert cuda.building()
    assert os.environ[cuda.ENV] == "mlx"  # kept by this process and those it starts
    assert cuda.for_run() is None and len(_Popen.calls) == 1


def test_on_a_fresh_machine_the_build_makes_its_cache_folder(gpu_like):
    """A fresh machine's cache has no folder for the library yet: the build's log goes
    there, so the folder is made first (the first run failed without it)."""
    gpu_like.parent.rmdir()
    assert cuda.for_run() is None
    assert _Popen.calls == [[sys.executable, "-m", "mlx_model.ops.cuda"]]
    assert gpu_like.with_name(gpu_like.name + ".log").exists()


@pytest.mark.parametrize(
    "t, fused", [(64, False), (192, False), (320, False), (128, True), (256, True), (512, True)]
)
def test_cudnn_attention_takes_only_sequences_it_runs_correctly(t, fused):
    """cuDNN 9.14's backward read out of bounds at T = 64, 192, 320 on an H200; those
    shapes run as MLX operations (`docs/runs/cudnn-verify-h200-20261201.log`)."""
    assert cuda.supports(mx.zeros((2, t, 3 * 6 * 64), mx.bfloat16), 6) is fused
    assert not cuda.supports(mx.zeros((2, t, 3 * 6 * 64), mx.float32), 6)


def _model(**fields):
    from mlx_model.config import GPTConfig

    return GPTConfig(**{"block_size": 256, "n_head": 6, "n_emb": 384, "dropout": 0.2, **fields})


def test_a_model_whose_attention_cudnn_does_not_run_builds_nothing_and_records_mlx(gpu_like):
    """cuDNN's attention runs for dropout on the attention weights and a context that is
    a multiple of 128; for other models the run records "mlx" and starts no build."""
    others = [_model(block_size=64), _model(dropout=0.0), _model(attention_dropout=False)]
    with ops.use("gpu"):
        for model in others:
            assert ops.signature("bfloat16", model=model)["attention"] == "mlx"
        assert not _Popen.calls and not cuda.building()
        ops.signature("bfloat16", model=_model())  # not built yet: MLX's, build started
    assert _Popen.calls == [[sys.executable, "-m", "mlx_model.ops.cuda"]]


def test_with_the_library_built_the_run_records_the_attention_that_runs(gpu_like, monkeypatch):
    monkeypatch.setattr(cuda, "load", lambda: object())
    gpu_like.write_text("")
    with ops.use("gpu"):
        assert ops.signature("bfloat16", model=_model())["attention"] == "cudnn"
        assert ops.signature("bfloat16", model=_model(block_size=64))["attention"] == "mlx"
        assert ops.signature("bfloat16", model=_model(dropout=0.0))["attention"] == "mlx"


def test_the_wait_for_the_build_is_announced_only_for_a_model_it_serves(gpu_like, monkeypatch):
    monkeypatch.setenv(cuda.ENV, "cudnn")
    monkeypatch.setattr(cuda, "needs_build", lambda: True)
    assert ops.cuda_build_pending("bfloat16", _model())
    assert not ops.cuda_build_pending("bfloat16", _model(block_size=64))
    assert not ops.cuda_build_pending("bfloat16", _model(attention_dropout=False))


def test_auto_with_the_library_runs_it(gpu_like, monkeypatch):
    gpu_like.write_text("")
    module = object()
    monkeypatch.setattr(cuda, "load", lambda: module)
    assert cuda.for_run() is module
    assert os.environ[cuda.ENV] == "cudnn" and not _Popen.calls and not cuda.building()


def test_a_failed_build_is_not_retried_every_run(gpu_like):
    cuda._failed_marker(gpu_like).write_text("no compiler\n")
    with pytest.warns(RuntimeWarning, match="cuDNN attention failed here before"):
        assert cuda.for_run() is None
    assert not _Popen.calls


def test_the_background_build_records_a_failure(gpu_like, monkeypatch):
    def fail():
        raise cuda.BuildError("g++ exited 1: boom")

    monkeypatch.setattr(cuda, "build", fail)
    with pytest.raises(cuda.BuildError):
        cuda._build_here()
    failed = gpu_like.with_name(gpu_like.name + ".failed")  # named after this build
    assert failed.read_text() == "g++ exited 1: boom\n"
    assert not cuda.wait_built(5)  # a failure ends the wait at once


def test_waiting_for_the_build_ends_when_the_library_appears(gpu_like):
    assert not cuda.wait_built(0.5)
    threading.Timer(0.5, lambda: gpu_like.write_text("")).start()
    assert cuda.wait_built(10)


def test_the_setting_is_checked_and_mlx_builds_nothing(gpu_like, monkeypatch):
    monkeypatch.setenv(cuda.ENV, "fast")
    with pytest.raises(ValueError, match=r"SHAKESPEARE_GPT_ATTENTION must be one of .* 'fast'"):
        cuda.for_run()
    monkeypatch.setenv(cuda.ENV, "mlx")
    assert cuda.for_run() is None and not _Popen.calls
    with pytest.raises(ValueError, match="attention must be one of .* got 'fast'"):
        cuda.pin("fast")


def test_the_train_stages_key_leaves_the_attention_out():
    """A first run computes attention with MLX's operations while cuDNN's builds; a rerun
    with nothing changed must find that run, so the key does not name the attention."""
    from tasks.train import train_key

    class Output:
        def digest(self, name):
            return f"digest of {name}"

    args = (Output(), Output(), TINY_CFG, TINY.train, ParallelConfig())
    base = {"mlx": "0.32.4", "device": "Device(gpu, 0)", "backend": "gpu", "lanes": 1}
    mlx_key = train_key(*args, {**base, "attention": "mlx"})
    assert mlx_key == train_key(*args, {**base, "attention": "cudnn"})
    assert mlx_key != train_key(*args, {**base, "backend": "reference"})


def test_a_resumed_run_keeps_the_attention_it_began_with(corpus_path, tmp_path, monkeypatch):
    from mlx_model.checkpoint import STATE
    from mlx_model.data import Vocab, split_tokens
    from mlx_model.train import LATEST, train

    monkeypatch.setenv(cuda.ENV, "auto")
    text = corpus_path.read_text()[:200_000]
    train_ids, val_ids = split_tokens(Vocab.from_text(text).encode(text), 0.1)
    train(TINY_CFG, TINY.train, train_ids, val_ids, tmp_path, stop_after=10)
    state_file = tmp_path / LATEST / STATE
    state = json.loads(state_file.read_text())
    assert "attention" in state  # recorded (None here: the CPU's backends have no choice)
    state_file.write_text(json.dumps({**state, "attention": "mlx"}))
    train(TINY_CFG, TINY.train, train_ids, val_ids, tmp_path, stop_after=20)
    assert os.environ[cuda.ENV] == "mlx"


@pytest.mark.parametrize(
    ("name", "value"),
    [("SHAKESPEARE_GPT_ATTENTION", "fast"), ("SHAKESPEARE_GPT_OPS", "tpu")],
)
def test_a_bad_setting_stops_a_run_before_any_stage(name, value, tmp_path, monkeypatch):
    from tasks.config import RunConfig
    from tasks.preflight import check_run

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be one of .* got '{value}'"):
        check_run(RunConfig.resolve("tiny"), str(tmp_path / "artifacts"))


def test_a_built_library_that_fails_its_check_is_not_rebuilt_every_run(gpu_like, monkeypatch):
    """A GPU or cuDNN that cannot plan the kernel: the library loads but its check fails.
    Rebuilding would not help: no rebuild, one warning, and a marker for the next runs."""
    gpu_like.write_text("")
    builds = []
    monkeypatch.setattr(cuda, "_planned", lambda: (gpu_like, builds.append))

    def check(lib):
        raise cuda.Unsupported(f"the built extension {lib.name} does not run here: no plan")

    monkeypatch.setattr(cuda, "_import", check)
    cuda._load_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="does not run here: no plan"):
        assert cuda.for_run() is None
    cuda._load_once.cache_clear()
    assert gpu_like.exists() and not builds  # kept, not rebuilt
    assert cuda._failed_marker(gpu_like).exists()


def test_a_shape_cudnn_cannot_plan_falls_back_to_mlx_once_warned(monkeypatch):
    class NoPlan:
        def causal_attention(self, *args):
            raise RuntimeError("cuDNN attention: check_support: no plan")

    monkeypatch.setattr(cuda, "for_run", lambda: NoPlan())
    monkeypatch.setattr(cuda, "supports", lambda qkv, n_head: True)
    qkv = mx.random.normal((2, 8, 3 * 16)).astype(mx.bfloat16)
    with ops.use("gpu"):
        with pytest.warns(RuntimeWarning, match=r"cannot run \(2, 8, 48\) here"):
            y = ops.causal_attention(qkv, 2, 0.1, True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per shape
            ops.causal_attention(qkv, 2, 0.1, True)
    assert y.shape == (2, 8, 16)


def test_a_run_switches_once_its_own_step_is_cached_while_the_child_goes_on():
    """The warm-up child of a run that built cuDNN attention goes on to compile the step
    with it; the run must not wait for that."""
    from mlx_model.warmup import Warmup

    class Running:
        def poll(self):
            return None

    class Cache:
        warm: set[str] = set()

        def is_warm(self, sig):
            return sig["name"] in self.warm

        def refresh(self):
            return 0

    cache = Cache()
    warm_up = Warmup(Running(), cache, Path("unused.log"), {"name": "this run's step"})
    assert not warm_up.ready()
    cache.warm.add("this run's step")
    assert warm_up.ready() and warm_up.failed is None


def test_the_wait_for_a_build_is_announced_only_where_the_run_waits(gpu_like, monkeypatch):
    """Under auto the build goes to the background (the train stage says so after); only
    SHAKESPEARE_GPT_ATTENTION=cudnn makes the run wait for the compiler."""
    monkeypatch.setattr(cuda, "needs_build", lambda: True)
    assert not ops.cuda_build_pending("bfloat16")  # auto
    monkeypatch.setenv(cuda.ENV, "mlx")
    assert not ops.cuda_build_pending("bfloat16")
    monkeypatch.setenv(cuda.ENV, "cudnn")
    assert ops.cuda_build_pending("bfloat16")
    assert not ops.cuda_build_pending("float32")


def test_the_librarys_check_runs_once_per_machine_and_only_a_pass_is_recorded(tmp_path):
    """`_import` checks the built library on a small input the first time it runs with a
    GPU, driver, cuDNN and build (the check cost every warm run 0.38 s on an H200) and
    records the pass."""
    record = tmp_path / "lib.so.checked"
    h200 = {"gpu": "NVIDIA H200", "architecture": "sm_90", "driver": "580", "cudnn": "9.14"}
    runs = []
    cuda.checked_once(record, h200, lambda: runs.append("h200"))
    cuda.checked_once(record, h200, lambda: runs.append("again"))
    assert runs == ["h200"] and json.loads(record.read_text()) == [h200]
    newer_driver = {**h200, "driver": "590"}

    def fails():
        raise cuda.Unsupported("computes a wrong result")

    with pytest.raises(cuda.Unsupported):
        cuda.checked_once(record, newer_driver, fails)
    assert json.loads(record.read_text()) == [h200]  # the failure is not recorded
    cuda.checked_once(record, newer_driver, lambda: runs.append("590"))
    assert runs == ["h200", "590"]
    assert json.loads(record.read_text()) == [h200, newer_driver]
    record.write_text("{not json")  # damaged: checked again, then rewritten
    cuda.checked_once(record, h200, lambda: runs.append("after damage"))
    assert runs[-1] == "after damage" and json.loads(record.read_text()) == [h200]


def test_importing_the_library_checks_it_once_then_trusts_the_record(tmp_path, monkeypatch):
    """`_import` runs the library's check on its first import with this GPU, driver, cuDNN
    and build, not on later ones; a library built again (another size or time) is checked
    again, and one that fails its check is refused."""
    lib = tmp_path / "lib.py"  # a module file stands in for the built extension
    good = (
        "import mlx.core as mx\n"
        "def causal_attention(qkv, seed, heads, scale, p):\n"
        "    return mx.ones((1, 256, 64), mx.bfloat16)  # \n"
    )
    wrong = good.replace("mx.ones(", "mx.zeros(").replace("  #", " #")  # mean 0; same size
    assert len(wrong) == len(good)
    monkeypatch.setattr(cuda, "machine", lambda: {"gpu": "NVIDIA H200", "driver": "580"})
    lib.write_text(good)
    cuda._import(lib)
    record = json.loads((tmp_path / "lib.py.checked").read_text())
    assert len(record) == 1 and record[0]["gpu"] == "NVIDIA H200"
    stat = lib.stat()
    lib.write_text(wrong)  # same size, same time: the record stands, no check runs
    os.utime(lib, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cuda._import(lib)
    os.utime(lib, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # built again
    with pytest.raises(cuda.Unsupported, match="computes a wrong result"):
        cuda._import(lib)
    assert len(json.loads((tmp_path / "lib.py.checked").read_text())) == 1
