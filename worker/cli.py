"""``byol worker`` and ``byol serve``, plugged into the ``byol`` command by entry point."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def cmd_worker(args: argparse.Namespace) -> int:
    from service.settings import SettingsError, load_settings
    from worker.job_runner import main

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise SystemExit(f"byol: error: {exc}") from None
    main(settings, max_jobs=args.max_jobs)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The API and one job worker on this machine, as two processes sharing the settings."""
    from service.settings import SettingsError, load_settings

    try:
        load_settings()  # fail here, in one line, before starting anything
    except SettingsError as exc:
        raise SystemExit(f"byol: error: {exc}") from None
    python = sys.executable
    api = [
        python, "-m", "uvicorn", "service.app:create_app", "--factory",
        "--host", args.host, "--port", str(args.port),
    ]  # fmt: skip
    procs = [
        subprocess.Popen(api),
        subprocess.Popen([python, "-m", "byol_core.cli", "worker"]),
    ]
    print(f"byol: API on http://{args.host}:{args.port} (docs at /docs), one worker; Ctrl-C stops")
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
    failed = [p.returncode for p in procs if p.returncode not in (0, -15, None)]
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run queued jobs of the service on Ray Train")
    p.add_argument("--max-jobs", type=int, help="exit after this many jobs (default: never)")
    p.set_defaults(func=cmd_worker)
