"""`shakespeare-gpt`: run the pipeline, one stage of it, sample, serve on a schedule, export."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from tasks.config import DEFAULT_PRESET, PRESETS
from tasks.download import CANONICAL_URL, MAX_BYTES, TINY_SHAKESPEARE_SHA256

from .pipeline import STAGES, export_pipeline, pipeline

DEPLOYMENT = "scheduled"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    p.add_argument(
        "--artifacts",
        default=None,
        help="artifact root (default: $SHAKESPEARE_GPT_ARTIFACTS or ./artifacts)",
    )
    p.add_argument("--source", default=CANONICAL_URL, help="corpus URL (http, https, file) or path")
    p.add_argument("--sha256", default=TINY_SHAKESPEARE_SHA256, help="expected corpus digest")
    p.add_argument(
        "--max-bytes", type=int, default=MAX_BYTES, help="refuse a larger download (bytes)"
    )
    p.add_argument("--max-iters", type=int, default=None, help="override the preset's step count")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="recompute this stage even if cached (repeatable; 'all' for every stage)",
    )
    p.add_argument(
        "--from",
        dest="from_stage",
        default=None,
        metavar="STAGE",
        help="recompute STAGE and every stage after it, reusing the cached upstream",
    )
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", default=None, help="end the sample before this string")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shakespeare-gpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("run", help="run the whole pipeline"))
    stage = sub.add_parser("stage", help="run the pipeline up to STAGE, reusing cached upstream")
    stage.add_argument("name", help=f"one of {', '.join(STAGES)}")
    _common(stage)
    _common(sub.add_parser("sample", help="sample text (upstream stages come from the cache)"))
    serve = sub.add_parser(
        "serve", help="register the flow as a deployment with a schedule, and run its runs"
    )
    _common(serve)
    serve.add_argument("--name", default=DEPLOYMENT, help="deployment name")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", default=None, help="cron schedule, e.g. '0 3 * * *'")
    when.add_argument(
        "--interval", type=_positive_int, default=None, help="schedule every N seconds"
    )
    export = sub.add_parser(
        "export", help="write the trained model in Hugging Face GPT-2 layout (trains if needed)"
    )
    _common(export)
    export.add_argument("--out", required=True, help="output folder")
    return parser


def flow_parameters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "preset": args.preset,
        "artifacts": args.artifacts,
        "source": args.source,
        "sha256": args.sha256,
        "max_bytes": args.max_bytes,
        "from_stage": args.from_stage,
        "force": args.force,
        "val_fraction": args.val_fraction,
        "max_iters": args.max_iters,
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
    }


def api_answers(api_url: str, timeout: float = 5.0) -> bool:
    """Whether the Prefect API's health endpoint answers."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def serve(args: argparse.Namespace) -> int:
    params = flow_parameters(args)
    # scheduled runs start in their own process: pin the artifact root to an absolute path
    root = args.artifacts or os.environ.get("SHAKESPEARE_GPT_ARTIFACTS") or "artifacts"
    params["artifacts"] = str(Path(root).resolve())
    pipeline.serve(
        name=args.name,
        cron=args.cron,
        interval=args.interval,
        parameters=params,
        description="download, tokenize, train, evaluate and sample; cached stage by stage",
    )
    return 0


def export(args: argparse.Namespace) -> int:
    try:
        out = export_pipeline(out=args.out, **flow_parameters(args))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported the trained model as GPT2LMHeadModel to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "export":
        return export(args)
    until = {"run": None, "stage": getattr(args, "name", None), "sample": "sample"}[args.command]
    for what, name in (("stage", until), ("stage", args.from_stage)):
        if name is not None and name not in STAGES:
            print(
                f"error: unknown {what} {name!r}; choose one of {', '.join(STAGES)}",
                file=sys.stderr,
            )
            return 2
    try:
        summary = pipeline(**flow_parameters(args), until=until, stream=True)
    except Exception as err:
        api = PREFECT_API_URL.value()
        if not api or api_answers(api):
            raise
        root = args.artifacts or os.environ.get("SHAKESPEARE_GPT_ARTIFACTS") or "artifacts"
        print(
            f"error: the Prefect API at {api} is not answering ({type(err).__name__}: {err}).\n"
            f"Stages that finished are kept under {Path(root).resolve()} and are verified by "
            "digest before reuse; rerun the same command when the server is back (or unset "
            "PREFECT_API_URL) to continue from them.",
            file=sys.stderr,
        )
        return 3
    if "sample" in summary and summary["cached"]["sample"]:
        print(f"----- sample -----\n{summary['sample']}")  # a cache hit: nothing was streamed
    if "eval" in summary:
        e = summary["eval"]
        print("----- validation -----")
        print(
            f"val_loss {e['val_loss']:.4f}  perplexity {e['perplexity']:.3f}  "
            f"bits/char {e['bits_per_char']:.4f}  ({e['tokens']} tokens)"
        )
    for stage, run in summary["reused"].items():
        print(f"reused {stage} from run {run}")
    print(f"cached: {json.dumps(summary['cached'])}")
    print(f"manifest: {summary['manifest']}")
    ui = PREFECT_UI_URL.value()
    if ui:
        print(f"flow run: {ui}/runs/flow-run/{summary['flow_run_id']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
