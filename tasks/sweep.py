"""Hyperparameter sweeps: the trials a grid or a random sample makes, and what a sweep
reports (a leaderboard table, the trials' validation curves, the best trial).

A sweep's record, `sweeps/<name>/sweep.json` under the artifact root, names every trial
with its settings, the train stage folder it used and its result; `best-of:<name>`
refers to its best trial's trained model (`best_trial`).
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import random
import urllib.parse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt  # noqa: E402
from prefect import task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from mlx_model.files import atomic_path, write_text_atomic  # noqa: E402
from mlx_model.runtime.lanes import ENV as LANES_ENV  # noqa: E402
from mlx_model.runtime.lanes import usable_cores  # noqa: E402

from .config import SECTIONS, RunConfig, parse_value  # noqa: E402
from .store import ArtifactStore, StageOutput, digest_json, safe_name  # noqa: E402
from .train import METRICS  # noqa: E402

SWEEPS = "sweeps"
RECORD = "sweep.json"
CURVES = "validation_curves.png"
BEST_OF = "best-of:"
# bare field names in a grid are looked up in these sections, in this order
GRID_SECTIONS = ("training", "model", "data")


def grid_field(name: str) -> tuple[str, str]:
    """(section, field) for 'section.field' or a bare model/training/data field name."""
    if "." in name:
        section, field = name.split(".", 1)
        if section not in SECTIONS or field not in SECTIONS[section].__dataclass_fields__:
            raise ValueError(f"unknown sweep field {name!r}")
        return section, field
    for section in GRID_SECTIONS:
        if name in {f for f in SECTIONS[section].__dataclass_fields__}:
            return section, name
    raise ValueError(f"unknown sweep field {name!r}: not a field of {', '.join(GRID_SECTIONS)}")


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """{'section.field': [values]} from 'field=v1,v2' strings (values typed by the field)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid takes FIELD=VALUE[,VALUE...], got {item!r}")
        section, field = grid_field(name)
        grid[f"{section}.{field}"] = [parse_value(section, field, v) for v in values.split(",")]
    return grid


def trials(
    preset: str,
    overrides: dict[str, dict[str, Any]],
    grid: dict[str, list[Any]],
    samples: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The trials: every combination of the grid, or `samples` of them drawn with `seed`.

    A grid maps a field ('learning_rate', 'model.dropout') to its values; a value that is
    a dict sets several fields at once ({"learning_rate": 3e-3, "min_lr": 3e-4}), and its
    key is then only a label.

    Each is {"name", "settings" (the grid's values), "overrides" (the run's overrides
    with them applied)}; every one is resolved here, so a bad value fails before any work.
    """
    if not grid:
        raise ValueError("a sweep needs at least one field to vary (--grid FIELD=V1,V2)")
    names = list(grid)
    for name in names:
        if not isinstance(grid[name], list) or not grid[name]:
            raise ValueError(f"sweep field {name!r} needs a non-empty list of values")
        if not any(isinstance(v, dict) for v in grid[name]):
            grid_field(name)
    combos = list(itertools.product(*(grid[n] for n in names)))
    if not isinstance(seed, int) or isinstance(seed, bool):  # a sweep file's "seed": "1"
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if samples is not None:
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        combos = random.Random(seed).sample(combos, min(samples, len(combos)))
    out = []
    for combo in combos:
        settings = dict(zip(names, combo, strict=True))
        merged = {s: dict(v) for s, v in (overrides or {}).items()}
        for name, value in settings.items():
            # a dict sets several fields together (a learning rate with its floor)
            for field_name, v in (value if isinstance(value, dict) else {name: value}).items():
                section, field = grid_field(field_name)
                merged.setdefault(section, {})[field] = v
        RunConfig.resolve(preset, merged)  # raises naming a bad value
        label = ",".join(
            ",".join(f"{k.split('.')[-1]}={x}" for k, x in v.items())
            if isinstance(v, dict)
            else f"{n.split('.')[-1]}={v}"
            for n, v in settings.items()
        )
        out.append({"name": label, "settings": settings, "overrides": merged})
    return out


def sweep_name(preset: str, overrides: dict, grid: dict, samples, seed) -> str:
    """'<preset>-sweep-<8 hex digits>' for the sweep's definition."""
    digest = digest_json({"o": overrides, "g": grid, "n": samples, "s": seed})[:8]
    return f"{preset}-sweep-{digest}"


def leaderboard_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished trials by validation loss (lowest first), then the failed ones."""

    def row(r: dict[str, Any]) -> dict[str, Any]:
        m = r.get("metrics") or {}
        return {
            "rank": None,
            "trial": r["name"],
            "status": r["status"],
            "val_loss": round(r["val_loss"], 4) if r.get("val_loss") is not None else None,
            "best_estimate": round(m["best_val_loss"], 4) if m else None,
            "final_estimate": round(m["history"][-1]["val_loss"], 4) if m else None,
            "steps": m.get("final_step"),
            "tokens_per_sec": round(m["tokens_per_sec"]) if m else None,
            "train_seconds": r.get("seconds"),
            "task_run": r.get("link"),
        }

    done = sorted((r for r in results if r["status"] == "completed"), key=lambda r: r["val_loss"])
    rows = [row(r) for r in done] + [row(r) for r in results if r["status"] != "completed"]
    for i, r in enumerate(rows[: len(done)]):
        r["rank"] = i + 1
    return rows


def curves_png(results: list[dict[str, Any]], title: str) -> bytes:
    """Every finished trial's validation estimates against step, one line each."""
    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=100)
    for r in results:
        if r.get("metrics"):
            history = r["metrics"]["history"]
            ax.plot([h["step"] for h in history], [h["val_loss"] for h in history], marker="o",
                    ms=2, label=r["name"])  # fmt: skip
    ax.set(xlabel="step", ylabel="validation loss (nats/char)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def trial_result(
    trial: dict[str, Any], trained: StageOutput | None, evaluated: StageOutput | None, error: str
) -> dict[str, Any]:
    """One trial's row data: its stage outputs, or the reason it failed."""
    result = {**trial, "status": "completed" if evaluated else f"failed: {error}"}
    if trained is not None:
        result["train"] = {"path": trained.path, "key": trained.key, "files": trained.files}
        result["metrics"] = json.loads(trained.file(METRICS).read_text())
        result["seconds"] = trained.info.get("seconds")
    if evaluated is not None:
        result["val_loss"] = evaluated.info["val_loss"]
    return result


@task(name="leaderboard", cache_policy=NO_CACHE)
def report_sweep(store: ArtifactStore, name: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The leaderboard table and curves picture in the UI, and the sweep's record on disk."""
    folder = store.root / SWEEPS / safe_name(name, "sweep name")
    rows = leaderboard_rows(results)
    create_table_artifact(table=rows, key="sweep-leaderboard", description=f"sweep {name}")
    png = curves_png(results, f"validation loss, {name}")
    with atomic_path(folder / CURVES) as tmp:
        tmp.write_bytes(png)
    encoded = base64.b64encode(png).decode()
    best = next(
        (r for r in results if r["status"] == "completed" and r["name"] == rows[0]["trial"]), None
    )
    summary = (
        f"Best trial: **{best['name']}**, validation loss {best['val_loss']:.4f}."
        if best
        else "No trial finished."
    )
    create_markdown_artifact(
        markdown=(
            "## Validation curves\n\n"
            f"![validation curves](data:image/png;base64,{encoded})\n\n"
            f"{summary} Use it with `--model {BEST_OF}{name}`.\n"
        ),
        key="sweep-curves",
        description=f"validation curves of sweep {name}",
    )
    record = {"name": name, "best": best["name"] if best else None, "trials": results}
    write_text_atomic(folder / RECORD, json.dumps(record, indent=2, default=str))
    return record


def best_trial(root: Path, reference: str) -> StageOutput:
    """The trained model `best-of:<sweep>` names: its best trial's train stage, verified."""
    if not reference.startswith(BEST_OF):
        raise ValueError(f"a model reference is best-of:<sweep name>, got {reference!r}")
    name = reference.removeprefix(BEST_OF)
    path = Path(root) / SWEEPS / safe_name(name, "sweep name") / RECORD
    if not path.exists():
        raise ValueError(f"no sweep named {name!r} under {root} (looked for {path})")
    record = json.loads(path.read_text())
    best = next((t for t in record["trials"] if t["name"] == record["best"]), None)
    if best is None:
        raise ValueError(f"sweep {name!r} has no finished trial")
    hit = ArtifactStore(root).lookup("train", best["train"]["key"])
    if hit is None:
        raise ValueError(f"the best trial of sweep {name!r} ({best['name']}) is missing or damaged")
    return hit


@task(name="promoted-model", cache_policy=NO_CACHE)
def promoted_model(store: ArtifactStore, reference: str) -> StageOutput:
    """The trained model a `best-of:<sweep>` reference names, instead of training one."""
    return best_trial(store.root, reference)


DASK_SCHEMES = ("tcp", "tls", "inproc", "ucx", "ws", "wss")


def check_cluster(address: str | None, workers: int | None) -> None:
    """Raise ValueError naming a bad cluster option: a worker count below 1 (a local
    cluster of -1 workers never starts, and the sweep waited for it forever), workers
    asked of a cluster that already exists, or an address Dask cannot dial."""
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if address is None:
        return
    if workers is not None:
        raise ValueError(
            "workers sizes a local cluster; an existing one (dask_address) has its own"
        )
    parts = urllib.parse.urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme not in DASK_SCHEMES
        or not parts.hostname
        or (port is None and parts.scheme != "inproc")
    ):
        raise ValueError(
            f"dask_address must be SCHEME://HOST:PORT with SCHEME one of "
            f"{', '.join(DASK_SCHEMES)}, got {address!r}"
        )


def local_cluster(workers: int | None = None) -> dict[str, Any]:
    """Keyword arguments for a local Dask cluster that trains trials side by side: one
    worker process per usable core (or `workers`), each running MLX on its share of the
    cores (lanes; `--workers 1` runs one trial at a time on all of them, and
    SHAKESPEARE_GPT_CPU_LANES, if set, wins) with one BLAS thread per lane."""
    check_cluster(None, workers)
    cores = usable_cores()
    n = workers or cores
    lanes = os.environ.get(LANES_ENV) or str(max(1, cores // n))
    return {
        "n_workers": n,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "env": {LANES_ENV: lanes, "OPENBLAS_NUM_THREADS": "1"},
    }
