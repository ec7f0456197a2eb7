"""Checkpoints: weights and optimiser state in safetensors, configuration in JSON."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from safetensors import SafetensorError
from safetensors.numpy import save_file

from .config import GPTConfig
from .data import file_sha256
from .files import atomic_path, write_text_atomic
from .model import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
BEST_RECORD = "best.json"  # beside a best model: {"step", "val_loss", "sha256"} of its estimate


def save_model(directory: Path, model: GPT, weights: dict[str, np.ndarray] | None = None) -> None:
    """Write `model.safetensors` and `config.json` into `directory`, each atomically.
    `weights` (flat host copies, as `snapshot` takes them) stand in for the model's
    current ones; given them, this makes no MLX call, so it may run on another thread."""
    directory = Path(directory)
    weights = weights if weights is not None else snapshot(model)["weights"]
    with atomic_path(directory / WEIGHTS) as tmp:
        save_arrays(weights, tmp, metadata={"format": "mlx"})
    write_text_atomic(directory / CONFIG, json.dumps(model.config.to_dict(), indent=2))


def save_arrays(arrays: dict[str, np.ndarray], path: Path, **kwargs: Any) -> None:
    """safetensors' `save_file`, its I/O failures raised as the OSError they are (a full
    disk is ENOSPC naming `path`, not a SafetensorError)."""
    try:
        save_file(arrays, str(path), **kwargs)
    except SafetensorError as err:
        if match := re.search(r"\(os error (\d+)\)", str(err)):
            code = int(match.group(1))
            raise OSError(code, os.strerror(code), str(path)) from err
        raise


def load_model(directory: Path) -> GPT:
    """Rebuild a GPT from `config.json` and load `model.safetensors`, checking they agree."""
    directory = Path(directory)
    cfg = GPTConfig.from_dict(json.loads((directory / CONFIG).read_text()))
    model = GPT(cfg)
    weights = mx.load(str(directory / WEIGHTS))
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        raise ValueError(
            f"checkpoint {directory / WEIGHTS} does not match its {CONFIG}: {err}"
        ) from None
    model.eval()
    mx.eval(model.parameters())
    return model


class CorruptCheckpointError(ValueError):
    """A checkpoint file differs from the digest its state.json recorded."""


def snapshot(
    model: GPT, optimizer: optim.Optimizer | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """The model's (and optimiser's) arrays now, copied to host memory: what a checkpoint
    written later must contain. Writers given it make no MLX call: MLX must not be used
    from two threads at once (a checkpoint thread's `mx.save_safetensors` reading the
    weights while the training thread read them crashed 2-GPU runs), so the copy is
    taken here, on the calling thread."""
    taken = {"weights": dict(tree_flatten(model.parameters()))}
    if optimizer is not None:
        taken["opt_state"] = dict(tree_flatten(optimizer.state))
    mx.eval(list(taken.values()))
    return {part: {k: np.array(v) for k, v in arrays.items()} for part, arrays in taken.items()}


def save_train_state(
    directory: Path,
    model: GPT,
    optimizer: optim.Optimizer,
    state: dict[str, Any],
    taken: dict[str, dict] | None = None,
) -> None:
    """Write everything needed to resume: weights, optimiser moments and step; from
    `taken` (a `snapshot`: no MLX call, any thread) if given, else from the model and
    optimiser as they are.

    The checkpoint is written whole into `<directory>.new/` (`state.json` last, recording
    the other files' SHA-256), then swapped in by two renames, so a process killed at any
    moment leaves a complete checkpoint, the old one or the new one (`recover` finds it).
    A checkpoint without `state.json` is incomplete and ignored, one whose files differ
    from it is refused.
    """
    directory = Path(directory)
    fresh, old = _sibling(directory, "new"), _sibling(directory, "old")
    recover(directory)  # a swap an earlier kill cut short is finished first
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    taken = taken or snapshot(model, optimizer)
    save_model(fresh, model, taken["weights"])
    with atomic_path(fresh / OPTIMIZER) as tmp:
        save_arrays(taken["opt_state"], tmp)
    files = {name: file_sha256(fresh / name) for name in (WEIGHTS, CONFIG, OPTIMIZER)}
    write_text_atomic(fresh / STATE, json.dumps({**state, "files": files}, indent=2))
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(fresh, directory)
    shutil.rmtree(old, ignore_errors=True)


def _sibling(directory: Path, tag: str) -> Path:
    return directory.with_name(f"{directory.name}.{tag}")


def recover(directory: Path) -> None:
    """Finish a checkpoint swap a kill cut short: with `directory` gone, the complete one
    of `<directory>.new` and `<directory>.old` (in that order) takes its place."""
    directory = Path(directory)
    if directory.exists():
        return
    for tag in ("new", "old"):
        candidate = _sibling(directory, tag)
        if (candidate / STATE).exists():
            os.replace(candidate, directory)
            return


def _check_fits(path: Path, loaded: dict[str, mx.array], optimizer: optim.Optimizer) -> None:
    """Raise CorruptCheckpointError unless `loaded` has the arrays (names and shapes) of
    `optimizer`'s state, where that is initialised (it holds more than scalars): MLX's
    optimizers take any dict, and moments of another layout would be kept beside zero
    ones (a joined optimizer's checkpoint resumed by the per-parameter one did so)."""
    expected = {k: v.shape for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
    if not any(shape for shape in expected.values()):
        return
    found = {k: v.shape for k, v in loaded.items()}
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or sorted(
            k for k in found if found[k] != expected[k]
        )
        raise CorruptCheckpointError(
            f"{path} does not fit: its optimizer state differs in {differ[:3]}"
            + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
        )


def load_train_state(
    directory: Path, model: GPT, optimizer: optim.Optimizer
) -> dict[str, Any] | None:
    """Restore a checkpoint written by `save_train_state` into `model` and `optimizer`.

    Returns its state dict, or None when there is no complete checkpoint. Raises
    CorruptCheckpointError when a file differs from the digest `state.json` recorded, or
    the optimizer's state does not fit `optimizer` (another optimizer or model wrote it).
    """
    directory = Path(directory)
    recover(directory)
    if not (directory / STATE).exists():
        return None
    try:
        state = json.loads((directory / STATE).read_text())
    except json.JSONDecodeError as err:
        raise CorruptCheckpointError(f"{directory / STATE} is not valid JSON: {err}") from None
    for name, digest in state.get("files", {}).items():
        if file_sha256(directory / name) != digest:
            raise CorruptCheckpointError(
                f"{directory / name} does not match the SHA-256 recorded in {directory / STATE}"
            )
    restored = load_model(directory)
    model.update(restored.parameters())
    opt_state = mx.load(str(directory / OPTIMIZER))
    _check_fits(directory / OPTIMIZER, opt_state, optimizer)
    try:
        optimizer.state = tree_unflatten(list(opt_state.items()))
    except ValueError as err:  # another optimizer's layout (`mlx_model.optimizer`)
        raise CorruptCheckpointError(f"{directory / OPTIMIZER} does not fit: {err}") from None
    mx.eval(model.parameters(), optimizer.state)
    return state
