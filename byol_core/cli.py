"""The ``byol`` command.

Subcommands of other packages (the worker's, the service's) plug in through the
``byol.commands`` entry-point group, so this module never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Any

from byol_core.errors import ByolError
from byol_core.presets import bases, load_document, resolve_spec, variants


def add_overrides_argument(
    parser: argparse.ArgumentParser,
    help: str = "override a field by dotted path, e.g. --set optim.lr=0.4 (repeatable)",
) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: every command that resolves a
    spec takes its overrides the same way."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec_file", nargs="?", help="YAML or JSON spec (fields of JobSpec)")
    parser.add_argument("--preset", "--variant", dest="variant", help="study variant, e.g. no_norm")
    parser.add_argument("--base", help=f"preset base: one of {', '.join(bases())}")
    add_overrides_argument(parser)


def spec_from_args(args: argparse.Namespace):
    document = load_document(args.spec_file) if args.spec_file else None
    return resolve_spec(document, base=args.base, variant=args.variant, overrides=args.overrides)


def cmd_variants(args: argparse.Namespace) -> int:
    print("bases:")
    for preset in bases().values():
        print(f"  {preset.name:14s} {preset.description}")
    print("variants:")
    for preset in variants().values():
        print(f"  {preset.name:14s} {preset.description}")
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    print(spec_from_args(args).model_dump_json(indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.fp32:
        args.overrides.append("runtime.precision=fp32")
    if args.device:
        args.overrides.append(f"runtime.device={args.device}")
    if args.workers:
        args.overrides.append(f"distributed.workers={args.workers}")
    if args.gpu:
        args.overrides.append("distributed.use_gpu=true")
    spec = spec_from_args(args)
    out_dir = args.out or default_out_dir_name(spec)
    if spec.distributed.workers > 1 or os.environ.get("RAY_ADDRESS"):
        # Data-parallel training lives in the worker package; found by entry point, not import.
        (backend,) = entry_points(group="byol.backends", name="ray")
        print(json.dumps(backend.load()(spec, out_dir)))
        return 0
    # torch is imported only here: listing presets or printing a spec stays instant.
    from byol_core.trainer import Trainer

    quiet = args.quiet

    def report(epoch: int, metrics: dict[str, Any]) -> None:
        if quiet:
            return
        shown = {k: v for k, v in metrics.items() if not k.startswith("lars/")}
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items() if k != "epoch")
        print(f"epoch {epoch}: {text}", file=sys.stderr, flush=True)

    trainer = Trainer(spec, out_dir, progress=not quiet, on_epoch_end=report)
    if args.resume:
        trainer.restore(args.resume)
    if not quiet:
        rt = trainer.runtime
        print(
            f"training {spec.name} ({spec.base}/{spec.variant}) on {rt.device}, "
            f"{'bf16' if rt.bf16 else 'fp32'}, {trainer.data.pretrain.images.shape[0]} images, "
            f"out: {out_dir}",
            file=sys.stderr,
            flush=True,
        )
    summary = trainer.fit()
    print(json.dumps(summary))
    return 0


def default_out_dir_name(spec) -> str:
    return f"runs/{spec.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byol", description="BYOL training and the study.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one spec in this process (CPU or one GPU)")
    _spec_arguments(p)
    p.add_argument("--out", help="run folder (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("-q", "--quiet", action="store_true", help="only the JSON summary")
    p.add_argument("--workers", type=int, help="data-parallel workers on Ray Train (> 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("variants", help="list the preset bases and the study's variants")
    p.set_defaults(func=cmd_variants)

    p = sub.add_parser("spec", help="print the fully resolved spec as JSON")
    _spec_arguments(p)
    p.set_defaults(func=cmd_spec)

    for ep in entry_points(group="byol.commands"):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ByolError as exc:
        # Failures a user can fix carry their own message; anything else is a bug and raises.
        parser.exit(2, f"byol: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "byol: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
