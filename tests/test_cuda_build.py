"""Where cuDNN attention's build finds its headers and libraries (`mlx_model.ops.cuda`), and
that without a GPU nothing is built or used. The build itself and the kernel run on a GPU
only (tests/test_cuda_attention.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_model import ops
from mlx_model.ops import cuda


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
