"""The end-to-end flow: download -> vocab -> tokenize -> train -> evaluate -> sample."""

from __future__ import annotations

import time
import uuid
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from tasks.config import DEFAULT_PRESET, RunConfig
from tasks.download import download_corpus
from tasks.evaluate import evaluate_model
from tasks.export import export_model
from tasks.manifest import write_manifest
from tasks.preflight import check_export_target, check_run
from tasks.prepare import build_vocab, check_prompt, tokenize
from tasks.report import report_run, report_training
from tasks.sample import sample_model
from tasks.store import ArtifactStore, StageOutput, output_of
from tasks.sweep import promoted_model
from tasks.train import train_model

from .stages import STAGES, check_stage, fresh_stages

__all__ = ["STAGES", "check_stage", "export_pipeline", "fresh_stages", "pipeline", "run_name"]


def run_name(parameters: dict[str, Any]) -> str:
    """'<preset>-<config digest>' for a flow run's parameters (or '<preset>-invalid')."""
    preset = parameters.get("preset") or DEFAULT_PRESET
    try:
        return RunConfig.resolve(preset, parameters.get("overrides")).name
    except (ValueError, TypeError):
        return f"{preset}-invalid"  # the flow itself raises the clear error


def _flow_run_name() -> str:
    return run_name(dict(flow_run.parameters))


@flow(name="shakespeare-gpt", flow_run_name=_flow_run_name, log_prints=True)
def pipeline(
    preset: str = DEFAULT_PRESET,
    overrides: dict[str, dict[str, Any]] | None = None,
    artifacts: str | None = None,
    until: str | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    stream: bool = False,
    model: str | None = None,
) -> dict[str, Any]:
    """Run the stages in order up to `until` (default: all), each a cache hit when nothing changed.

    `overrides` ({"training": {"max_iters": 100}, "sampling": {...}, ...}) change the
    preset's configuration; `from_stage` recomputes that stage and every later one,
    reusing the cached upstream; `force` names stages to recompute even when cached
    ("all" for every stage); `stream` prints the sample to stdout as it is generated;
    `model` ("best-of:<sweep>") evaluates and samples that sweep's best trial instead of
    training.
    """
    config = RunConfig.resolve(preset, overrides)
    fresh = fresh_stages(until, from_stage, list(force or []))
    check_run(config, artifacts)  # a run started through the API is checked here too
    wanted = STAGES[: STAGES.index(until) + 1] if until else STAGES
    # unique even for two identical runs started in the same second (they must not share a folder)
    run_id = str(flow_run.id or uuid.uuid4())[:8]
    run_folder = f"{time.strftime('%Y%m%d-%H%M%S')}-{config.name}-{run_id}"
    store = ArtifactStore(artifacts, run=run_folder)

    def stage(name: str, task: Any, *args: Any, **kwargs: Any) -> StageOutput | None:
        """The stage's output if the run goes that far, recomputed if `fresh` names it."""
        if name not in wanted:
            return None
        return output_of(task(store, *args, force=name in fresh, **kwargs))

    corpus = stage("download", download_corpus, config.source)
    vocab = stage("vocab", build_vocab, corpus)
    if vocab and "sample" in wanted:
        check_prompt(vocab, config.sampling)  # before training: it needs only the vocabulary
    tokens = stage("tokenize", tokenize, corpus, vocab, config.data)
    if model and "train" in wanted:
        trained = promoted_model(store, model)
    else:
        trained = stage(
            "train", train_model, tokens, vocab, config.model, config.training, config.parallel
        )
    evaluation = stage("evaluate", evaluate_model, trained, tokens)
    sample = stage("sample", sample_model, trained, config.sampling, stream=stream)

    outputs = [o for o in (corpus, vocab, tokens, trained, evaluation, sample) if o is not None]
    if trained:
        report_training(trained, store.root / "runs" / run_folder, run_folder)
    described = {**config.to_dict(), **({"promoted_model": model} if model else {})}
    report_run(run_folder, described, outputs)
    manifest = write_manifest(store, run_folder, described, outputs)  # last: complete
    return {
        "run": run_folder,
        "flow_run_id": str(flow_run.id),
        "manifest": manifest,
        "cached": {o.stage: o.cached for o in outputs},
        "reused": {o.stage: o.produced_by for o in outputs if o.cached},
        "outputs": {o.stage: o for o in outputs},
        "eval": evaluation.info if evaluation else None,
        "sample": sample.info["text"] if sample else None,
    }


def _export_run_name() -> str:
    return "export-" + run_name(dict(flow_run.parameters))


@flow(name="shakespeare-gpt-export", flow_run_name=_export_run_name, log_prints=True)
def export_pipeline(
    out: str,
    preset: str = DEFAULT_PRESET,
    overrides: dict[str, dict[str, Any]] | None = None,
    artifacts: str | None = None,
    force: list[str] | None = None,
    model: str | None = None,
) -> str:
    """The pipeline up to `evaluate` (cached stages reused), then the Hugging Face export
    with a model card that states the validation loss."""
    check_export_target(out)
    config = RunConfig.resolve(preset, overrides)
    summary = pipeline(preset, overrides, artifacts, until="evaluate", force=force, model=model)
    outputs = summary["outputs"]
    return export_model(
        outputs["train"], out, outputs["evaluate"], config.sampling, config.data, config.source
    )
