"""``byol submit``, ``byol status`` and ``byol serve``, plugged into the ``byol`` command through
the ``byol.commands`` entry point (``register``)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from byol_core.cli import add_overrides_argument
from byol_core.errors import ByolError
from byol_core.presets import load_document, resolve_spec
from byol_core.sweep import resolve_sweep
from service.client import ApiClient, default_url

LOCAL_TOKEN = Path(".byol/api-token")
SHOWN = ("id", "name", "status", "owner", "attempts", "progress", "mlflow", "result", "error")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("submit", help="submit a spec file as a job to the job API")
    p.add_argument("spec_file", help="YAML or JSON spec, resolved exactly as `byol train` does")
    p.add_argument("--preset", "--variant", dest="variant", help="study variant, e.g. no_norm")
    p.add_argument("--base", help="preset base")
    add_overrides_argument(p)
    _connection_arguments(p)
    p.add_argument("--token", help="API token (default: $BYOL_API_TOKEN)")
    p.add_argument("--idempotency-key", help="reuse to make a repeated submit return the same job")
    p.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("status", help="show a job of the job API")
    p.add_argument("job_id", metavar="ID")
    _connection_arguments(p)
    p.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("serve", help="the job API and one job worker, on this machine")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="API server processes")
    p.add_argument("--no-worker", action="store_true", help="the API only (workers run elsewhere)")
    p.set_defaults(func=cmd_serve)


def _connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"API base URL (default: $BYOL_API_URL or {default_url()})")


def _summary(job: dict[str, Any]) -> str:
    return json.dumps({k: job.get(k) for k in SHOWN if job.get(k) is not None})


def _follow(client: ApiClient, job_id: str) -> dict[str, Any]:
    for event in client.stream(job_id):
        progress = event.get("progress") or {}
        epoch = (
            f" epoch {progress['epoch']}/{progress.get('epochs')}" if progress.get("epoch") else ""
        )
        print(f"{job_id}: {event['status']}{epoch}", file=sys.stderr, flush=True)
    return client.wait(job_id)


def api_token(token: str | None, command: str) -> str:
    """``--token``, else $BYOL_API_TOKEN, else the token `byol serve` made for this folder."""
    token = token or os.environ.get("BYOL_API_TOKEN") or _local_token()
    if not token:
        raise ByolError(f"{command} needs an API token: pass --token or set BYOL_API_TOKEN")
    return token


def cmd_submit(args: argparse.Namespace) -> int:
    token = api_token(args.token, "submit")
    document = load_document(args.spec_file)
    # A sweep's base is resolved through the presets exactly as a training spec is.
    resolve = resolve_sweep if document.get("kind") == "sweep" else resolve_spec
    spec = resolve(document, base=args.base, variant=args.variant, overrides=args.overrides)
    with ApiClient(args.url, token) as client:
        job = client.submit(spec.model_dump(mode="json"), args.idempotency_key)
        if args.wait:
            job = _follow(client, job["id"])
    print(_summary(job))
    return 0 if not args.wait or job["status"] == "succeeded" else 1


def cmd_status(args: argparse.Namespace) -> int:
    with ApiClient(args.url) as client:
        job = _follow(client, args.job_id) if args.wait else client.status(args.job_id)
    print(_summary(job))
    return 0


def _local_token() -> str | None:
    """The token `byol serve` made for this folder, when it runs with no configured tokens."""
    try:
        return LOCAL_TOKEN.read_text().strip() or None
    except OSError:
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    """The API (uvicorn) and one `byol worker`, as two supervised processes sharing the
    settings. With no BYOL_API_TOKENS configured, a token for this folder is made and kept in
    .byol/api-token, where `byol submit` finds it."""
    from service.settings import SettingsError, load_settings

    try:
        settings = load_settings()  # a bad setting fails here, in one line, before any start
    except SettingsError as exc:
        raise ByolError(str(exc)) from None
    env = dict(os.environ)
    if not settings.api_tokens:
        token = _local_token() or secrets.token_urlsafe(24)
        LOCAL_TOKEN.parent.mkdir(exist_ok=True)
        LOCAL_TOKEN.touch(mode=0o600)
        LOCAL_TOKEN.write_text(token + "\n")
        env["BYOL_API_TOKENS"] = json.dumps({getpass.getuser(): token})
        print(f"byol: API token in {LOCAL_TOKEN} (byol submit reads it)", file=sys.stderr)
    api = [
        sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
        "--host", args.host, "--port", str(args.port), "--workers", str(args.workers),
    ]  # fmt: skip
    procs = [subprocess.Popen(api, env=env)]
    if not args.no_worker:
        # A separate process: the worker imports torch and Ray, the API never does.
        procs.append(subprocess.Popen([sys.executable, "-m", "byol_core.cli", "worker"], env=env))
    print(
        f"byol: API on http://{args.host}:{args.port} (OpenAPI docs at /docs)"
        + ("" if args.no_worker else ", one job worker")
        + "; Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    for p in procs:
        if p.poll() is None:
            p.terminate()  # the worker hands a running job back to the queue
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
    return 0 if all(p.returncode in (0, -signal.SIGTERM) for p in procs) else 1
