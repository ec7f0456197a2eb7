"""The fast CPU path: MLX's matrix products go to OpenBLAS, not the wheel's reference BLAS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import mlx_model, mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))"


def sgemm_binding(env_extra: dict[str, str]) -> str:
    """The library the dynamic linker binds libmlx's cblas_sgemm to, from LD_DEBUG."""
    env = {**os.environ, "LD_DEBUG": "bindings", **env_extra}
    run = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    lines = [
        line for line in run.stderr.splitlines() if "libmlx" in line and "`cblas_sgemm'" in line
    ]
    assert lines, "libmlx never bound cblas_sgemm"
    return lines[0].split(" to ")[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU wheel only")
def test_mlx_matmul_binds_to_openblas():
    assert "libopenblas" in sgemm_binding({})
    # the control: with the preload switched off, the same probe binds the reference BLAS
    assert "libopenblas" not in sgemm_binding({"SHAKESPEARE_GPT_BLAS": "off"})
