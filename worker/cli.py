"""``byol worker``, ``byol sweep`` and ``byol reproduce``, plugged into ``byol`` by entry point."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from byol_core.cli import add_overrides_argument


def cmd_worker(args: argparse.Namespace) -> int:
    from service.settings import SettingsError, load_settings
    from worker.job_runner import main

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise SystemExit(f"byol: error: {exc}") from None
    main(settings, max_jobs=args.max_jobs)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A sweep on this machine's Ray (or ``RAY_ADDRESS``); the same ``--out`` resumes it."""
    from byol_core.cli import default_out_dir_name
    from byol_core.presets import load_document
    from byol_core.sweep import resolve_sweep

    sweep = resolve_sweep(
        load_document(args.spec_file),
        base=args.base,
        variant=args.variant,
        overrides=args.overrides,
    )
    import ray  # Ray and torch only once the spec is valid

    from worker.tune import run_sweep

    out = args.out or default_out_dir_name(sweep)
    # Ray Tune prints its banners on stdout, and Ray its last warnings: the summary's place.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            summary = run_sweep(sweep, out, progress=not args.quiet)
        finally:
            ray.shutdown()
    print(json.dumps(summary))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run queued jobs of the service on Ray Train")
    p.add_argument("--max-jobs", type=int, help="exit after this many jobs (default: never)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("sweep", help="search hyper-parameters: Ray Train trials in Ray Tune")
    p.add_argument("spec_file", help="YAML or JSON sweep spec (kind: sweep; see docs/sweeps.md)")
    p.add_argument("--preset", "--variant", dest="variant", help="variant of the base spec")
    p.add_argument("--base", help="preset base of the base spec")
    add_overrides_argument(
        p, help="override a field of the base spec, e.g. --set epochs=3 (repeatable)"
    )
    p.add_argument("--out", help="sweep folder (default: runs/NAME-TIMESTAMP); reuse to resume")
    p.add_argument("-q", "--quiet", action="store_true", help="only the JSON summary")
    p.set_defaults(func=cmd_sweep)

    from worker.reproduce import register as register_reproduce

    register_reproduce(sub)
