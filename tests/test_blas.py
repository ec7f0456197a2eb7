"""The fast CPU path: MLX's matrix products go to OpenBLAS, not the wheel's reference BLAS."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU wheel")

PROBE = (
    "import mlx_model, mlx.core as mx; from mlx_model.runtime import blas as _blas; "
    "mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64))); print(_blas.loaded)"
)
SYSTEM_OPENBLAS = ctypes.util.find_library("openblas")


def probe(env_extra: dict[str, str]) -> tuple[dict[str, str], str, str]:
    """{symbol: library it bound to} for libmlx's and the shim's BLAS calls (from
    LD_DEBUG), what mlx_model says it loaded, and the run's warnings."""
    env = {**os.environ, "LD_DEBUG": "bindings", **env_extra}
    run = subprocess.run(
        [sys.executable, "-W", "always", "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    bindings = {}
    for line in run.stderr.splitlines():
        if "sgemm'" in line and ("libmlx" in line or "libblas-shim" in line):
            symbol = line.rsplit("`", 1)[1].rstrip("'")
            bindings[symbol] = line.split(" to ")[1].split()[0]
    warnings = "\n".join(line for line in run.stderr.splitlines() if "Warning" in line)
    return bindings, run.stdout.strip(), warnings


def test_mlx_matmul_goes_to_the_scipy_openblas_dependency(tmp_path):
    bindings, loaded, _ = probe({"XDG_CACHE_HOME": str(tmp_path)})  # shim built afresh
    assert "libscipy_openblas" in loaded
    assert "libblas-shim" in bindings["cblas_sgemm"]  # libmlx -> the shim
    assert "libscipy_openblas" in bindings["scipy_cblas_sgemm"]  # shim -> OpenBLAS
    assert len(list((tmp_path / "shakespeare-gpt").glob("libblas-shim-*.so"))) == 1
    # the control: with the preload switched off, the same probe binds the reference BLAS
    bindings, loaded, _ = probe({"SHAKESPEARE_GPT_BLAS": "off"})
    assert loaded == "None"
    assert "libblas" in bindings["cblas_sgemm"] and "shim" not in bindings["cblas_sgemm"]
    assert "openblas" not in bindings["cblas_sgemm"]


def test_without_a_compiler_it_falls_back_to_a_system_openblas_or_warns(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": str(tmp_path)}  # no cc, no cached shim
    bindings, loaded, warnings = probe(env)
    if SYSTEM_OPENBLAS:
        assert loaded == "libopenblas.so.0"
        assert "libopenblas" in bindings["cblas_sgemm"]
    else:
        assert loaded == "None"
        assert "no C compiler (cc, gcc or clang)" in warnings


@pytest.mark.skipif(SYSTEM_OPENBLAS is None, reason="no system OpenBLAS")
def test_a_named_blas_is_loaded_instead():
    bindings, loaded, _ = probe({"SHAKESPEARE_GPT_BLAS": "libopenblas.so.0"})
    assert loaded == "libopenblas.so.0"
    assert "libopenblas.so" in bindings["cblas_sgemm"]
