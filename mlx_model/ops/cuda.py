"""cuDNN's fused causal attention with dropout for MLX's CUDA backend
(`csrc/cuda_attention.cpp`): its build, and the call the `gpu` backend makes.

MLX's fused attention has no dropout, so GPT-2's attention in training (dropout on the
weights) ran as separate MLX operations: the (B, H, T, T) scores, mask, softmax, a random
draw per weight, and two products, with the heads transposed in and out. cuDNN's fused
attention computes the same function in one kernel forward and one backward, its
dropout masks drawn by a Philox generator from a seed that MLX's generator draws.

The extension is compiled against the installed MLX's headers, cuDNN's frontend (the
`nvidia-cudnn-frontend` package, a header-only C++ library), cuDNN's and the CUDA
runtime's headers, and linked against `libcudart`; the `cuda` extra installs them all. A
build takes 20.0 to 34.8 s on an H200 host, once per MLX install, cached in
`~/.cache/shakespeare-gpt/` (`mlx_model.runtime.build.plan_mlx_extension`).

Which attention a process runs (`SHAKESPEARE_GPT_ATTENTION`):

- `auto` (the default): cuDNN's if it is built. If not, the build starts in a detached
  background process and this process computes attention with MLX's operations, so a
  first run on a fresh machine does not wait for the compiler; runs from then on use
  cuDNN's. The choice is then written into the variable, so that this process keeps it
  and the processes it starts (the kernel warm-up, data-parallel ranks) make the same.
- `cudnn`: cuDNN's, built first if needed (the run waits); MLX's where it cannot be built.
- `mlx`: MLX's operations.

A failed build warns once and leaves its log beside the library; MLX's operations are
used. The two attentions draw different dropout masks, so a run records which it used and
a resumed run keeps it (`mlx_model.train`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import mlx.core as mx

from ..files import locked, write_text_atomic
from ..runtime.build import built, load_extension, plan_mlx_extension, unbuilt

if TYPE_CHECKING:
    from ..config import GPTConfig

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "cuda_attention.cpp"
MODULE = "_cuda_attention"
BUILD_TIMEOUT_S = 600
CUDA_MAJOR = 13  # MLX's CUDA build (mlx[cuda13]) runs on the CUDA 13 runtime
ENV = "SHAKESPEARE_GPT_ATTENTION"
CUDNN_DISTRIBUTIONS = (f"nvidia-cudnn-cu{CUDA_MAJOR}", "nvidia-cudnn-cu12")
CHOICES = ("auto", "cudnn", "mlx")

_lock = threading.Lock()


class BuildError(RuntimeError):
    """The extension could not be built or loaded here."""


class Unsupported(BuildError):
    """The extension loads but fails its check here (a GPU or cuDNN that cannot plan it):
    building it again would not help."""

    rebuild = False


def usable() -> bool:
    """Whether this process runs MLX on an NVIDIA GPU (Linux, MLX's CUDA backend)."""
    return (
        sys.platform.startswith("linux")
        and mx.cuda.is_available()
        and mx.default_device() == mx.gpu
    )


def load() -> ModuleType | None:
    """The extension module, built if needed; None (after one warning) if it cannot be,
    or where MLX does not run on an NVIDIA GPU."""
    return _load_once() if usable() else None


def choice() -> str:
    """The attention setting (`SHAKESPEARE_GPT_ATTENTION`, default auto); ValueError names
    a bad one."""
    value = os.environ.get(ENV) or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV} must be one of {list(CHOICES)}, got {value!r}")
    return value


def for_run() -> ModuleType | None:
    """The extension this process's attention runs, or None for MLX's operations, as the
    setting says (see the module's doc); the first answer under `auto` is kept."""
    setting = choice()
    if setting == "mlx" or not usable():
        return None
    if setting == "cudnn":
        return load()
    ext = _auto()
    os.environ[ENV] = "cudnn" if ext is not None else "mlx"
    return ext


def pin(setting: str) -> None:
    """Set `SHAKESPEARE_GPT_ATTENTION` for this process and those it starts: a resumed run
    must draw its dropout masks as it began."""
    if setting not in CHOICES:
        raise ValueError(f"attention must be one of {list(CHOICES)}, got {setting!r}")
    os.environ[ENV] = setting


def building() -> bool:
    """Whether this process started the background build."""
    return _build_started


_build_started = False


@functools.cache
def _auto() -> ModuleType | None:
    """auto: the extension if it is built; else None, with its build started (once)."""
    global _build_started
    try:
        lib = _planned()[0]
    except BuildError:
        return load()  # warns once, naming what is missing
    failed = _failed_marker(lib)
    if failed.exists():
        warnings.warn(
            f"cuDNN attention failed here before ({failed}); attention runs as MLX "
            "operations. Remove that file to try again.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if lib.exists():
        ext = load()
        if ext is None:  # built but unusable here: the warning said why; not every run
            failed.write_text("the built library does not work here\n")
        return ext
    lib.parent.mkdir(parents=True, exist_ok=True)  # a fresh machine's cache has no folder yet
    with open(lib.with_name(lib.name + ".log"), "ab") as err:
        subprocess.Popen(
            [sys.executable, "-m", "mlx_model.ops.cuda"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # outlives this run; a terminal's Ctrl-C is not for it
            cwd=Path(__file__).resolve().parents[2],  # imports this checkout's mlx_model
        )
    _build_started = True
    return None


def wait_built(timeout: float) -> bool:
    """Wait until the extension is built (True), its build has failed or `timeout` seconds
    have passed (False)."""
    try:
        lib = _planned()[0]
    except BuildError:
        return False
    deadline = time.monotonic() + timeout
    while not lib.exists():
        if _failed_marker(lib).exists() or time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def _failed_marker(lib: Path) -> Path:
    """Beside the library, named after it: another MLX or source builds anew."""
    return lib.with_name(lib.name + ".failed")


def _build_here() -> int:
    """The background build: one at a time (a lock), skipped if another finished it."""
    lib = _planned()[0]
    lib.parent.mkdir(parents=True, exist_ok=True)
    with locked(lib.with_name(lib.name + ".lock")):
        if not lib.exists():
            try:
                build()
            except (BuildError, OSError) as err:
                _failed_marker(lib).write_text(f"{err}\n")
                raise
    return 0


def needs_build() -> bool:
    """Whether `load()` would compile first (once per MLX install): worth a line before."""
    if not usable() or _load_once.cache_info().currsize:
        return False
    return unbuilt(_planned, BuildError)


SEQUENCE_MULTIPLE = 128  # as the extension's kSequenceMultiple


def supports(qkv: mx.array, n_head: int) -> bool:
    """Whether the fused kernel takes this projection (B, T, 3C): bfloat16 or float16 and
    `takes(T, head_dim)`."""
    head_dim = qkv.shape[-1] // 3 // n_head
    return qkv.dtype in (mx.bfloat16, mx.float16) and takes(qkv.shape[1], head_dim)


def trains(model: GPTConfig) -> bool:
    """Whether training `model` would run its attention as the fused kernel: dropout on
    its attention weights (without it MLX's own fused attention runs) and a shape the
    kernel `takes`."""
    return model.attention_p > 0 and takes(model.block_size, model.head_dim)


def takes(seq_len: int, head_dim: int) -> bool:
    """Whether the fused kernel runs attention over `seq_len` positions of heads of
    `head_dim`: head_dim a multiple of 8 up to 128 (cuDNN's fused attention), seq_len a
    multiple of 128.

    The last is measured, not documented: on an H200 with cuDNN 9.14, the backward read
    out of bounds at T = 64, 192 and 320 (an illegal memory access, the process lost),
    with every engine cuDNN offered; at T = 128, 256 and 512 its gradients matched the
    forward's dropout mask (`docs/runs/cudnn-verify-h200-20261201.log`)."""
    return (
        head_dim % 8 == 0
        and 0 < head_dim <= 128
        and seq_len > 0
        and seq_len % SEQUENCE_MULTIPLE == 0
    )


def causal_attention(ext: ModuleType, qkv: mx.array, n_head: int, p: float) -> mx.array:
    """Causal self-attention with dropout p on its weights, (B, T, 3C) -> (B, T, C), its
    dropout seeded by two values from MLX's generator (so `mx.random.seed` decides it)."""
    seed = mx.random.randint(0, 2**31 - 1, (2,))
    scale = 1.0 / math.sqrt(qkv.shape[-1] // 3 // n_head)
    return ext.causal_attention(qkv, seed, n_head, scale, p)


@functools.cache
def _load_once() -> ModuleType | None:
    with _lock:
        return load_extension(
            _planned,
            _import,
            BuildError,
            "cuDNN attention is not available ({err}); attention with dropout runs as MLX "
            "operations, which is slower. Install the `cuda` extra's packages and a C++ "
            "compiler to use it.",
        )


def build() -> Path:
    """The cached extension library, compiled if missing; BuildError says why it cannot be."""
    return built(_planned)


def _nvidia_roots() -> list[Path]:
    """The folders of the `nvidia` namespace package (pip's CUDA and cuDNN wheels)."""
    spec = importlib.util.find_spec("nvidia")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def _cuda_homes() -> list[Path]:
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    found = []
    for home in filter(None, homes):
        found += [Path(home), Path(home) / "targets" / "x86_64-linux"]
    return found


def _holding(relative: str, folders: Iterable[Path]) -> Path | None:
    return next((f for f in folders if (f / relative).exists()), None)


def _frontend_include() -> Path | None:
    spec = importlib.util.find_spec("cudnn")  # nvidia-cudnn-frontend's Python package
    folders = [Path(spec.origin).parents[1] / "include"] if spec and spec.origin else []
    return _holding("cudnn_frontend.h", folders + [Path("/usr/include")])


def find_inputs(
    nvidia: list[Path], cuda_homes: list[Path], mlx_include: Path, frontend: Path | None
) -> dict[str, Path]:
    """The folders the build needs, from pip's `nvidia` packages (`nvidia`), CUDA toolkits
    (`cuda_homes`), the system's include folders, MLX's headers (`mlx_include`) and cuDNN's
    frontend headers (`frontend`); BuildError names each one not found."""
    cu = [r / f"cu{CUDA_MAJOR}" for r in nvidia]
    cuda_include = [c / "include" for c in cu + cuda_homes]
    system = [Path("/usr/include"), Path("/usr/include/x86_64-linux-gnu")]
    lib_folders = [c / "lib" for c in cu] + [h / d for h in cuda_homes for d in ("lib64", "lib")]
    found = {
        "cuDNN's frontend headers (pip install nvidia-cudnn-frontend)": frontend,
        "cudnn.h": _holding("cudnn.h", [r / "cudnn" / "include" for r in nvidia] + system),
        "cuda_runtime_api.h": _holding("cuda_runtime_api.h", cuda_include),
        "crt/host_defines.h (pip install nvidia-cuda-crt)": _holding(
            "crt/host_defines.h", cuda_include
        ),
        f"libcudart.so.{CUDA_MAJOR}": _holding(f"libcudart.so.{CUDA_MAJOR}", lib_folders),
        "MLX's CUDA headers": _holding("mlx/backend/cuda/device.h", [mlx_include]),
        "MLX's CCCL headers": _holding("nv/target", [mlx_include / "cccl"]),
    }
    missing = [name for name, folder in found.items() if folder is None]
    if missing:
        raise BuildError(f"not found: {', '.join(missing)}")
    return found


def build_flags(found: dict[str, Path]) -> tuple[list[str], list[str]]:
    """The compiler flags and linker arguments for the folders `find_inputs` found."""
    *headers, cudart_dir, _, cccl = found.values()
    includes = [CSRC / "fmt_shim", cccl, *dict.fromkeys(headers)]  # fmt: MLX's headers want it
    flags = ["-O1", "-std=c++20", "-DCUDNN_FRONTEND_SKIP_JSON_LIB"]
    flags += [f"-I{folder}" for folder in includes]
    cudart = cudart_dir / f"libcudart.so.{CUDA_MAJOR}"
    return flags, [str(cudart), f"-Wl,-rpath,{cudart_dir}"]


def _planned() -> tuple[Path, Callable[[Path], Path]]:
    """The cached library's path and the function that builds it into a folder."""
    mlx_include = Path(mx.__file__).parent / "include"
    found = find_inputs(_nvidia_roots(), _cuda_homes(), mlx_include, _frontend_include())
    flags, link = build_flags(found)
    try:
        frontend = importlib.metadata.version("nvidia-cudnn-frontend")
    except importlib.metadata.PackageNotFoundError:
        frontend = "system"
    shim = (CSRC / "fmt_shim" / "fmt" / "format.h").read_text()
    return plan_mlx_extension(
        MODULE, SOURCE, flags, link, [frontend, shim], BUILD_TIMEOUT_S, BuildError
    )


def machine() -> dict[str, str]:
    """What decides whether a built library runs here: the GPU's name and architecture
    (`mx.device_info`), the NVIDIA driver's version and cuDNN's (its pip package's)."""
    info = mx.device_info()
    try:
        driver = Path("/sys/module/nvidia/version").read_text().strip()
    except OSError:
        driver = ""
    cudnn = ""
    for name in CUDNN_DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            cudnn = f"{name} {importlib.metadata.version(name)}"
            break
    return {
        "gpu": str(info.get("device_name", "")),
        "architecture": str(info.get("architecture", "")),
        "driver": driver,
        "cudnn": cudnn,
    }


def checked_once(record: Path, here: dict[str, str], check: Callable[[], None]) -> None:
    """Run `check` unless `record` (a JSON list of such dicts) holds `here`; after it
    passes, add `here` (atomically; a damaged record counts as empty). A failing check
    raises and records nothing."""
    try:
        passed = json.loads(record.read_text())
        passed = passed if isinstance(passed, list) else []
    except (OSError, ValueError):
        passed = []
    if here in passed:
        return
    check()
    with contextlib.suppress(OSError):  # an unwritable cache: check again next time
        write_text_atomic(record, json.dumps([*passed, here], indent=1))


def _import(lib: Path) -> ModuleType:
    """The built library as a module, checked on a small input the first time it runs
    with this GPU model, driver, cuDNN and build (`checked_once`, recorded beside it in
    `<library>.checked`): the check took 0.38 s of every warm run's start on an H200.
    Raises BuildError where it does not load, Unsupported where its check fails."""
    spec = importlib.util.spec_from_file_location(MODULE, lib)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import {lib}")
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as err:
        raise BuildError(f"the built extension {lib.name} does not load: {err}") from err

    def check() -> None:
        # with values of ones each output is its row's kept weights over (1 - p): 1 on
        # average over the rows
        try:
            qkv = mx.concatenate(
                [mx.random.normal((1, 256, 128), key=mx.random.key(0)), mx.ones((1, 256, 64))],
                -1,
            ).astype(mx.bfloat16)
            y = module.causal_attention(qkv, mx.array([1, 2], mx.int64), 1, 0.125, 0.25)
            off = abs(y.astype(mx.float32).mean().item() - 1.0)
        except (TypeError, RuntimeError, ValueError) as err:
            raise Unsupported(f"the built extension {lib.name} does not run here: {err}") from err
        if not off < 0.1:
            raise Unsupported(f"the built extension {lib.name} computes a wrong result ({off:g})")

    built_at = lib.stat()  # a library built again is checked again
    here = {**machine(), "library": f"{built_at.st_size} bytes, {built_at.st_mtime_ns} ns"}
    checked_once(lib.with_name(lib.name + ".checked"), here, check)
    return module


if __name__ == "__main__":  # the background build that `for_run` starts
    raise SystemExit(_build_here())
