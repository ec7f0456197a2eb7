"""`shakespeare-gpt`: run the pipeline, one stage of it, or sample from it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tasks.config import DEFAULT_PRESET, PRESETS
from tasks.download import CANONICAL_URL, TINY_SHAKESPEARE_SHA256

from .pipeline import STAGES, pipeline


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    p.add_argument(
        "--artifacts",
        default=None,
        help="artifact root (default: $SHAKESPEARE_GPT_ARTIFACTS or ./artifacts)",
    )
    p.add_argument("--source", default=CANONICAL_URL, help="corpus URL (http, https, file) or path")
    p.add_argument("--sha256", default=TINY_SHAKESPEARE_SHA256, help="expected corpus digest")
    p.add_argument("--max-iters", type=int, default=None, help="override the preset's step count")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="recompute this stage even if cached (repeatable; 'all' for every stage)",
    )
    _sampling(p)


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shakespeare-gpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("run", help="run the whole pipeline"))
    stage = sub.add_parser("stage", help="run the pipeline up to STAGE, reusing cached upstream")
    stage.add_argument("name", help=f"one of {', '.join(STAGES)}")
    _common(stage)
    _common(sub.add_parser("sample", help="sample text (upstream stages come from the cache)"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    until = {"run": None, "stage": getattr(args, "name", None), "sample": "sample"}[args.command]
    if until is not None and until not in STAGES:
        print(f"error: unknown stage {until!r}; choose one of {', '.join(STAGES)}", file=sys.stderr)
        return 2
    summary = pipeline(
        preset=args.preset,
        artifacts=args.artifacts,
        source=args.source,
        sha256=args.sha256,
        until=until,
        force=args.force,
        val_fraction=args.val_fraction,
        max_iters=args.max_iters,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if "sample" in summary:
        print("\n----- sample -----")
        print(summary["sample"])
    if "eval" in summary:
        e = summary["eval"]
        print("----- validation -----")
        print(
            f"val_loss {e['val_loss']:.4f}  perplexity {e['perplexity']:.3f}  "
            f"bits/char {e['bits_per_char']:.4f}  ({e['tokens']} tokens)"
        )
    print(f"cached: {json.dumps(summary['cached'])}")
    print(f"manifest: {summary['manifest']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
