"""``byol reproduce``: the study's table and collapse figure, regenerated in one command.

The grid (variants × seeds of a reproduction preset, see byol_core/study.py) runs as one sweep:
here on Ray Tune, or as a job of a running service (``--service URL``). Either way the sweep
writes results.csv, results.md and figures/ into its folder and its MLflow parent run; with
``--service`` they are fetched from MLflow into ``--out`` when the tracking server is reachable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from byol_core.cli import add_overrides_argument
from byol_core.errors import ByolError
from byol_core.study import reproduction_sweep, reproductions, variant_groups
from byol_core.sweep import SweepSpec

REPORT_FILES = ("results.csv", "results.md", "figures")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="reproduce the study's table: its variants x seeds as one sweep",
        description="Run the study's ablation grid (one Ray Tune sweep over variants x seeds) and "
        "write results.csv, results.md and figures/ to --out and the sweep's MLflow run.",
    )
    p.add_argument("--preset", default="cpu", choices=sorted(reproductions()))
    p.add_argument(
        "--data",
        metavar="NAME_OR_PATH",
        help="a built-in dataset (cifar10, stl10, shapes, ...) or an ImageFolder path; its test/ "
        "or val/ subfolder is the evaluation split (default: the preset's)",
    )
    p.add_argument("--image-size", type=int, help="side of the images and the crops")
    p.add_argument("--epochs", type=int)
    p.add_argument(
        "--seeds",
        type=int,
        help="seeds per variant, exactly (default: the preset's, with byol and random at its "
        "anchor_seeds)",
    )
    p.add_argument(
        "--variants",
        metavar="A,B,...",
        help=f"variants or groups ({', '.join(variant_groups())}); default: table",
    )
    add_overrides_argument(
        p, help="override a field of every trial's spec, e.g. --set data.train_limit=2000"
    )
    p.add_argument(
        "--out", help="folder (default: runs/reproduce-PRESET-TIMESTAMP); reuse to resume"
    )
    p.add_argument("--service", metavar="URL", help="submit to a running job service instead")
    p.add_argument(
        "--token",
        help="API token for --service (default: $BYOL_API_TOKEN, else the token `byol serve` "
        "made in this folder)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow server to fetch the results from with --service (default: "
        "$MLFLOW_TRACKING_URI)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    sweep = reproduction_sweep(
        args.preset,
        data=args.data,
        image_size=args.image_size,
        epochs=args.epochs,
        seeds=args.seeds,
        variant_names=args.variants,
        overrides=args.overrides,
    )
    out = Path(args.out or f"runs/reproduce-{args.preset}-{datetime.now(UTC):%Y%m%d-%H%M%S}")
    trials = len(sweep.space["variant,seed"].values)
    say = (
        (lambda line: None)
        if args.quiet
        else (lambda line: print(line, file=sys.stderr, flush=True))
    )
    say(f"reproduce {args.preset}: {trials} trials ({sweep.base.epochs} epochs each), out: {out}")
    if args.service:
        run_on_service(sweep, out, args, say)
    else:
        run_here(sweep, out, quiet=args.quiet)
    table = out / "results.md"
    if table.exists():
        print(table.read_text())
        say(f"results: {out.resolve()}/results.csv, results.md, figures/")
    return 0


def run_here(sweep: SweepSpec, out: Path, quiet: bool) -> None:
    import ray

    from worker.tune import run_sweep

    # Ray Tune prints banners on stdout: the table's place.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            run_sweep(sweep, out, progress=not quiet)
        finally:
            ray.shutdown()


def run_on_service(sweep: SweepSpec, out: Path, args: argparse.Namespace, say) -> None:
    from service.cli import api_token
    from service.client import ApiClient

    token = api_token(args.token, "--service")
    with ApiClient(args.service, token) as client:
        job = client.submit(sweep.model_dump(mode="json"))
        say(f"submitted job {job['id']} to {client.url}")
        last = None
        for event in client.stream(job["id"]):
            line = f"{job['id']}: {event.get('status')}"
            if line != last:
                say(line)
                last = line
        job = client.wait(job["id"])
    if job["status"] != "succeeded":
        raise ByolError(f"job {job['id']} {job['status']}: {job.get('error') or 'see byol status'}")
    mlflow = job.get("mlflow") or {}
    fetch_report(mlflow.get("run_id"), out, args.tracking_uri, mlflow.get("url"), say)


def fetch_report(
    run_id: str | None, out: Path, tracking_uri: str | None, url: str | None, say
) -> None:
    """Download the sweep run's report artifacts into ``out``."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    where = url or f"MLflow run {run_id}"
    if not run_id or not uri:
        say(f"the results are artifacts of {where}: set --tracking-uri to fetch them into {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        try:
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=str(out), tracking_uri=uri
            )
        except Exception as exc:
            raise ByolError(f"could not fetch {name} of {where} from {uri}: {exc}") from None
