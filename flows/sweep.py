"""The sweep flow: the data stages once, then train and evaluate mapped over the trials
on a Dask cluster (Prefect's DaskTaskRunner), then the leaderboard."""

from __future__ import annotations

import time
import uuid
from typing import Any

import dask
from prefect import flow, get_client, unmapped
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL
from prefect.states import Completed, Crashed
from prefect_dask import DaskTaskRunner

from tasks.config import DEFAULT_PRESET, RunConfig
from tasks.download import download_corpus
from tasks.evaluate import evaluate_model
from tasks.preflight import check_run
from tasks.prepare import build_vocab, tokenize
from tasks.store import ArtifactStore, output_of
from tasks.sweep import local_cluster, report_sweep, sweep_name, trial_result, trials
from tasks.train import train_model


def _sweep_run_name() -> str:
    p = dict(flow_run.parameters)
    try:
        preset = p.get("preset") or DEFAULT_PRESET
        return sweep_name(preset, p.get("overrides") or {}, p.get("grid") or {}, p.get("samples"),
                          p.get("seed", 0))  # fmt: skip
    except (ValueError, TypeError):
        return "sweep-invalid"


@flow(name="shakespeare-gpt-sweep", flow_run_name=_sweep_run_name, log_prints=True)
def sweep_pipeline(
    preset: str = DEFAULT_PRESET,
    overrides: dict[str, dict[str, Any]] | None = None,
    grid: dict[str, list[Any]] | None = None,
    samples: int | None = None,
    seed: int = 0,
    artifacts: str | None = None,
) -> Any:
    """Train and evaluate one trial per grid combination (or `samples` of them), each an
    ordinary cached train and evaluate stage; report the leaderboard and the best trial."""
    overrides = overrides or {}
    base = RunConfig.resolve(preset, overrides)
    check_run(base, artifacts)
    plan = trials(preset, overrides, grid or {}, samples, seed)  # every trial checked first
    name = sweep_name(preset, overrides, grid or {}, samples, seed)
    run_id = str(flow_run.id or uuid.uuid4())[:8]
    store = ArtifactStore(artifacts, run=f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{run_id}")
    corpus = output_of(download_corpus(store, base.source))
    vocab = output_of(build_vocab(store, corpus))
    tokens = output_of(tokenize(store, corpus, vocab, base.data))
    configs = [RunConfig.resolve(preset, t["overrides"]) for t in plan]
    trained = train_model.map(
        unmapped(store), unmapped(tokens), unmapped(vocab),
        [c.model for c in configs], [c.training for c in configs], [c.parallel for c in configs],
    )  # fmt: skip
    evaluated = evaluate_model.map(unmapped(store), trained, unmapped(tokens))
    results = []
    for trial, train_future, eval_future in zip(plan, trained, evaluated, strict=True):
        t = _outcome(train_future)
        # an evaluation whose training failed never runs: only ask for it after a success
        e = t if isinstance(t, BaseException) else _outcome(eval_future)
        error = f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else ""
        t = None if isinstance(t, BaseException) else output_of(t)
        e = None if isinstance(e, BaseException) else output_of(e)
        results.append(trial_result(trial, t, e, error))
        ui = PREFECT_UI_URL.value()
        run = str(train_future.task_run_id)
        results[-1]["link"] = f"{ui}/runs/task-run/{run}" if ui else run
    record = report_sweep(store, name, results)
    failed = [r for r in results if r["status"] != "completed"]
    if failed:
        reasons = "; ".join(f"{r['name']}: {r['status']}" for r in failed)
        message = f"{len(failed)} of {len(results)} trials failed ({reasons})"
        return Completed(name="Completed with failed trials", message=message, data=record)
    return record


def _outcome(future) -> Any:
    """The task's result, or its failure as an exception. A task whose worker process died
    under it (Dask's KilledWorker) never reported its end: its task run is marked Crashed
    with the reason, and the error is returned like any other failure."""
    try:
        return future.result(raise_on_failure=False)
    except Exception as err:  # the engine lost the task, not the task failing
        message = f"its worker was lost: {type(err).__name__}: {err}"
        with get_client(sync_client=True) as client:
            client.set_task_run_state(future.task_run_id, Crashed(message=message), force=True)
        return err


def dask_runner(address: str | None = None, workers: int | None = None) -> DaskTaskRunner:
    """An existing Dask cluster at `address`, or a local one (`tasks.sweep.local_cluster`)
    whose workers share the cores instead of fighting over them."""
    if address:
        return DaskTaskRunner(address=address)
    environ = dask.config.get("distributed.nanny.pre-spawn-environ", {})
    dask.config.set(
        {
            # a worker that dies mid-trial fails that trial with Dask's KilledWorker (a
            # failed row; the nanny starts a new worker and the other trials go on).
            # Retried by Dask under the same Prefect task run instead, the trial finished
            # but the flow run never returned
            "distributed.scheduler.allowed-failures": 0,
            # the nanny's MALLOC_TRIM_THRESHOLD_=65536 turns off glibc's adaptive mmap
            # threshold: MLX's large CPU buffers were mapped and unmapped on every use,
            # and training steps ran 15-20% slower (docs/BENCHMARKS.md)
            "distributed.nanny.pre-spawn-environ": {
                k: v for k, v in environ.items() if k != "MALLOC_TRIM_THRESHOLD_"
            },
        }
    )
    return DaskTaskRunner(cluster_kwargs=local_cluster(workers))
