"""The end-to-end flow: download -> vocab -> tokenize -> train -> evaluate -> sample."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from tasks.config import DEFAULT_PRESET, DataConfig, SampleConfig, get_preset
from tasks.download import CANONICAL_URL, TINY_SHAKESPEARE_SHA256, download_corpus
from tasks.evaluate import evaluate_model
from tasks.manifest import write_manifest
from tasks.prepare import build_vocab, tokenize
from tasks.sample import sample_model
from tasks.store import ArtifactStore, StageOutput, digest_json
from tasks.train import train_model

STAGES = ("download", "vocab", "tokenize", "train", "evaluate", "sample")


def check_stages(until: str | None, force: list[str]) -> None:
    for name in ([until] if until else []) + list(force):
        if name not in STAGES and name != "all":
            raise ValueError(f"unknown stage {name!r}; choose one of {list(STAGES)}")


@flow(name="shakespeare-gpt", log_prints=True)
def pipeline(
    preset: str = DEFAULT_PRESET,
    artifacts: str | None = None,
    source: str = CANONICAL_URL,
    sha256: str = TINY_SHAKESPEARE_SHA256,
    until: str | None = None,
    force: list[str] | None = None,
    val_fraction: float = 0.1,
    max_iters: int | None = None,
    prompt: str = "\n",
    max_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the stages in order up to `until` (default: all), each a cache hit when nothing changed.

    `force` names stages to recompute even when cached ("all" for every stage).
    """
    force = list(force or [])
    check_stages(until, force)
    chosen = get_preset(preset)
    training = chosen.train if max_iters is None else chosen.train.replace(max_iters=max_iters)
    data = DataConfig(val_fraction=val_fraction)
    sampling = SampleConfig(prompt, max_tokens, temperature, top_k, top_p, seed)
    store = ArtifactStore(artifacts)
    last = STAGES.index(until) if until else len(STAGES) - 1

    def forced(stage: str) -> bool:
        return stage in force or "all" in force

    outputs: list[StageOutput] = [download_corpus(store, source, sha256, force=forced("download"))]
    if last >= 1:
        outputs.append(build_vocab(store, outputs[0], force=forced("vocab")))
    if last >= 2:
        outputs.append(tokenize(store, outputs[0], outputs[1], data, force=forced("tokenize")))
    if last >= 3:
        outputs.append(
            train_model(
                store, outputs[2], outputs[1], chosen.model, training, force=forced("train")
            )
        )
    if last >= 4:
        outputs.append(evaluate_model(store, outputs[3], outputs[2], force=forced("evaluate")))
    if last >= 5:
        outputs.append(sample_model(store, outputs[3], sampling, force=forced("sample")))

    params = {
        "preset": preset,
        "model": chosen.model.to_dict(),
        "training": training.to_dict(),
        "data": data.to_dict(),
        "sampling": sampling.to_dict(),
        "source": source,
        "until": until,
    }
    run_name = f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}-{digest_json(params)[:8]}"
    manifest = write_manifest(store, run_name, params, outputs)
    by_stage = {o.stage: o for o in outputs}
    summary: dict[str, Any] = {
        "run": run_name,
        "manifest": manifest,
        "cached": {o.stage: o.cached for o in outputs},
        "paths": {o.stage: o.path for o in outputs},
    }
    if "evaluate" in by_stage:
        summary["eval"] = by_stage["evaluate"].info
    if "sample" in by_stage:
        summary["sample"] = by_stage["sample"].info["text"]
    get_run_logger().info("stages cached: %s", summary["cached"])
    return summary
