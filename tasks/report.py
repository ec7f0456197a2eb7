"""What a run shows in the Prefect UI: metrics table, loss curve, sample and configuration.

Artifacts are created on every run, cache hit or not, so each flow run's page is
complete; the loss-curve PNG is also kept with the run's files (runs/<run>/).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt  # noqa: E402
from prefect import task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from mlx_model.files import atomic_path  # noqa: E402

from .store import StageOutput  # noqa: E402
from .train import METRICS  # noqa: E402

LOSS_CURVE = "loss_curve.png"


def metrics_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per log interval: the mean loss of its training batches, learning rate and
    tokens/s, and where an evaluation ran, its train and validation estimates."""
    evals = {h["step"]: h for h in metrics["history"]}
    log = metrics.get("train_log") or [
        {
            "step": h["step"],
            "train_loss": None,
            "lr": h["lr"],
            "tokens_per_sec": h["tokens_per_sec"],
        }
        for h in metrics["history"]
    ]

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    rows = []
    for entry in log:
        estimate = evals.get(entry["step"], {})
        rows.append(
            {
                "step": entry["step"],
                "batch_loss": rounded(entry["train_loss"]),
                "train_loss": rounded(estimate.get("train_loss")),
                "val_loss": rounded(estimate.get("val_loss")),
                "lr": float(f"{entry['lr']:.3g}"),
                "tokens_per_sec": round(entry["tokens_per_sec"]),
            }
        )
    return rows


def loss_curve_png(metrics: dict[str, Any], title: str) -> bytes:
    """The training batches' loss at every log interval, and the train and validation
    estimates at every evaluation, against step, as PNG bytes."""
    history, log = metrics["history"], metrics.get("train_log", [])
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if log:
        steps = [h["step"] for h in log]
        ax.plot(steps, [h["train_loss"] for h in log], lw=1, alpha=0.6, label="training batches")
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_loss"] for h in history], marker="o", ms=3, label="train estimate")
    ax.plot(steps, [h["val_loss"] for h in history], marker="o", ms=3, label="validation")
    best = min(history, key=lambda h: h["val_loss"])
    ax.axvline(best["step"], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel="loss (nats/char)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


@task(name="report-training", cache_policy=NO_CACHE)
def report_training(trained: StageOutput, run_dir: Path, run_name: str) -> str:
    """Table artifact of the evaluation history and a markdown artifact with the loss curve."""
    metrics = json.loads(trained.file(METRICS).read_text())
    create_table_artifact(
        table=metrics_rows(metrics),
        key="training-metrics",
        description=f"training loss per log interval, estimates per evaluation, run {run_name}",
    )
    png = loss_curve_png(metrics, f"loss curve, {run_name}")
    path = Path(run_dir) / LOSS_CURVE
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    encoded = base64.b64encode(png).decode()
    origin = "reused from run " + str(trained.produced_by) if trained.cached else "trained now"
    create_markdown_artifact(
        markdown=(
            f"## Loss curve\n\n![loss curve](data:image/png;base64,{encoded})\n\n"
            f"Best validation estimate **{metrics['best_val_loss']:.4f}** at step "
            f"{metrics['best_step']} of {metrics['final_step']}"
            f"{' (stopped early: no improvement)' if metrics.get('stopped_early') else ''} "
            f"({origin}). "
            f"File: `{path}`\n"
        ),
        key="loss-curve",
        description=f"loss curve, run {run_name}",
    )
    return str(path)


@task(name="report-run", cache_policy=NO_CACHE)
def report_run(run_name: str, params: dict[str, Any], outputs: list[StageOutput]) -> None:
    """Markdown artifact: the generated sample, validation figures, stages and configuration."""
    by_stage = {o.stage: o for o in outputs}
    parts = [f"# Run {run_name}\n"]
    if "sample" in by_stage:
        text = by_stage["sample"].info["text"]
        parts.append(f"## Sample\n\n```text\n{text}\n```\n")
    if params.get("promoted_model"):
        parts.append(
            f"## Model\n\n`{params['promoted_model']}`: the best trial of that sweep, from "
            f"`{by_stage['train'].path}` (not trained by this run).\n"
        )
    if "evaluate" in by_stage:
        e = by_stage["evaluate"].info
        parts.append(
            "## Validation\n\n| loss | perplexity | bits/char | tokens |\n"
            "| --- | --- | --- | --- |\n"
            f"| {e['val_loss']:.4f} | {e['perplexity']:.3f} | {e['bits_per_char']:.4f} "
            f"| {e['tokens']} |\n"
        )
    if "train" in by_stage and "runtime" in by_stage["train"].info:
        t = by_stage["train"].info
        runtime = ", ".join(f"{k} {v}" for k, v in t["runtime"].items())
        stop = " (stopped early)" if t.get("stopped_early") else ""
        parts.append(
            f"## Training\n\nBest validation estimate {t['best_val_loss']:.4f} at step "
            f"{t['best_step']} of {t['final_step']}{stop}; trained with {runtime}.\n"
        )
    rows = "".join(
        f"| {o.stage} | {'reused' if o.cached else 'computed'} | {o.produced_by or ''} "
        f"| `{o.key[:16]}` |\n"
        for o in outputs
    )
    header = "| stage | status | produced by run | key |\n| --- | --- | --- | --- |\n"
    parts.append(f"## Stages\n\n{header}{rows}")
    parts.append(f"## Configuration\n\n```json\n{json.dumps(params, indent=2)}\n```\n")
    create_markdown_artifact(
        markdown="\n".join(parts), key="run-summary", description=f"summary of run {run_name}"
    )
