"""The end-to-end flow: download -> vocab -> tokenize -> train -> evaluate -> sample."""

from __future__ import annotations

import time
import uuid
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks.config import DEFAULT_PRESET, DataConfig, SampleConfig, TrainConfig, get_preset
from tasks.download import (
    CANONICAL_URL,
    MAX_BYTES,
    TINY_SHAKESPEARE_SHA256,
    download_corpus,
)
from tasks.evaluate import evaluate_model
from tasks.export import export_model
from tasks.manifest import write_manifest
from tasks.prepare import build_vocab, tokenize
from tasks.report import report_run, report_training
from tasks.sample import sample_model
from tasks.store import ArtifactStore, StageOutput, digest_json
from tasks.train import train_model

STAGES = ("download", "vocab", "tokenize", "train", "evaluate", "sample")


def fresh_stages(until: str | None, from_stage: str | None, force: list[str]) -> set[str]:
    """The stages to recompute even when cached: `force` ('all' for every one) plus
    `from_stage` and every stage after it. Raises naming an unknown stage."""
    for name in [n for n in (until, from_stage) if n] + list(force):
        if name not in STAGES and name != "all":
            raise ValueError(f"unknown stage {name!r}; choose one of {list(STAGES)}")
    last = STAGES.index(until) if until else len(STAGES) - 1
    chosen = set(STAGES) if "all" in force else set(force)
    if from_stage:
        first = STAGES.index(from_stage)
        if first > last:
            raise ValueError(f"from_stage {from_stage!r} comes after until {until!r}")
        chosen |= set(STAGES[first : last + 1])
    return chosen


def resolve_config(
    preset: str = DEFAULT_PRESET,
    source: str = CANONICAL_URL,
    val_fraction: float = 0.1,
    max_iters: int | None = None,
    prompt: str = "\n",
    max_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop: str | None = None,
    **_: Any,
) -> dict[str, Any]:
    """The full configuration a run uses, as plain data (validated by the dataclasses)."""
    chosen = get_preset(preset)
    training = chosen.train if max_iters is None else chosen.train.replace(max_iters=max_iters)
    sampling = SampleConfig(prompt, max_tokens, temperature, top_k, top_p, seed, stop)
    return {
        "preset": preset,
        "source": source,
        "model": chosen.model.to_dict(),
        "training": training.to_dict(),
        "data": DataConfig(val_fraction=val_fraction).to_dict(),
        "sampling": sampling.to_dict(),
    }


def config_name(config: dict[str, Any]) -> str:
    """'<preset>-<8 hex digits of the configuration digest>': what ran, at a glance."""
    return f"{config['preset']}-{digest_json(config)[:8]}"


def run_name_for(params: dict[str, Any]) -> str:
    preset = params.get("preset", DEFAULT_PRESET)
    try:
        return config_name(resolve_config(**params))
    except (ValueError, TypeError):
        return f"{preset}-invalid"  # the flow itself raises the clear error


def _flow_run_name() -> str:
    return run_name_for(dict(flow_run.parameters))


@flow(name="shakespeare-gpt", flow_run_name=_flow_run_name, log_prints=True)
def pipeline(
    preset: str = DEFAULT_PRESET,
    artifacts: str | None = None,
    source: str = CANONICAL_URL,
    sha256: str = TINY_SHAKESPEARE_SHA256,
    max_bytes: int = MAX_BYTES,
    until: str | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    val_fraction: float = 0.1,
    max_iters: int | None = None,
    prompt: str = "\n",
    max_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop: str | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    """Run the stages in order up to `until` (default: all), each a cache hit when nothing changed.

    `from_stage` recomputes that stage and every later one, reusing the cached upstream;
    `force` names stages to recompute even when cached ("all" for every stage).
    `stream` prints the sample to stdout as it is generated.
    """
    fresh = fresh_stages(until, from_stage, list(force or []))
    config = resolve_config(
        preset, source, val_fraction, max_iters, prompt, max_tokens, temperature, top_k, top_p,
        seed, stop,
    )  # fmt: skip
    chosen = get_preset(preset)
    training = TrainConfig.from_dict(config["training"])
    sampling = SampleConfig.from_dict(config["sampling"])
    name = config_name(config)
    # unique even for two identical runs started in the same second (they must not share a folder)
    run_id = str(flow_run.id or uuid.uuid4())[:8]
    run_dir_name = f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{run_id}"
    store = ArtifactStore(artifacts, run=run_dir_name)
    last = STAGES.index(until) if until else len(STAGES) - 1
    logger = get_run_logger()

    outputs: list[StageOutput] = [
        download_corpus(store, source, sha256, max_bytes, force="download" in fresh)
    ]
    if last >= 1:
        outputs.append(build_vocab(store, outputs[0], force="vocab" in fresh))
    if last >= 2:
        data = DataConfig.from_dict(config["data"])
        outputs.append(tokenize(store, outputs[0], outputs[1], data, force="tokenize" in fresh))
    if last >= 3:
        outputs.append(
            train_model(
                store, outputs[2], outputs[1], chosen.model, training, force="train" in fresh
            )
        )
    if last >= 4:
        outputs.append(evaluate_model(store, outputs[3], outputs[2], force="evaluate" in fresh))
    if last >= 5:
        outputs.append(
            sample_model(store, outputs[3], sampling, force="sample" in fresh, stream=stream)
        )

    for o in outputs:
        if o.cached:
            logger.info("%s: reused the artifacts of run %s (%s)", o.stage, o.produced_by, o.path)
    run_dir = store.root / "runs" / run_dir_name
    by_stage = {o.stage: o for o in outputs}
    if "train" in by_stage:
        report_training(by_stage["train"], run_dir, run_dir_name)
    report_run(run_dir_name, config, outputs)
    manifest = write_manifest(store, run_dir_name, config, outputs)  # last: the run is complete
    summary: dict[str, Any] = {
        "run": run_dir_name,
        "flow_run_id": str(flow_run.id),
        "manifest": manifest,
        "cached": {o.stage: o.cached for o in outputs},
        "reused": {o.stage: o.produced_by for o in outputs if o.cached},
        "paths": {o.stage: o.path for o in outputs},
        "outputs": by_stage,
    }
    if "evaluate" in by_stage:
        summary["eval"] = by_stage["evaluate"].info
    if "sample" in by_stage:
        summary["sample"] = by_stage["sample"].info["text"]
    logger.info("stages cached: %s", summary["cached"])
    return summary


@flow(name="shakespeare-gpt-export", log_prints=True)
def export_pipeline(out: str, **params: Any) -> str:
    """The pipeline up to `train` (cached stages reused), then the Hugging Face export."""
    summary = pipeline(**{**params, "until": "train"})
    return export_model(summary["outputs"]["train"], out)
