"""`byol reproduce` for real, as a user runs it: a subprocess on a local Ray cluster, trials on
Ray Train inside Ray Tune, a real MLflow server. Tiny networks and the offline shapes data keep
it short; tests/test_service_e2e.py runs the same command against the job service."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from mlflow.tracking import MlflowClient

TINY = [
    "--data", "shapes", "--epochs", "2", "--image-size", "32",
    "--set", "batch_size=64", "--set", "data.train_limit=256", "--set", "data.eval_limit=200",
    "--set", "model.encoder.width=8", "--set", "model.projector.hidden_dim=64",
    "--set", "model.predictor.hidden_dim=64", "--set", "model.projection_dim=32",
]  # fmt: skip


def test_reproduce_writes_the_table_and_figures_to_its_folder_and_mlflow(tmp_path, mlflow_server):
    out = tmp_path / "repro"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "byol_core.cli",
            "reproduce",
            *TINY,
            "--variants",
            "no_norm,random",
            # One round of two trials: the anchor seeds' default grid is tests/test_study.py's,
            # and a variant over several seeds runs in tests/test_service_e2e.py.
            "--seeds",
            "1",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The table on stdout, progress on stderr.
    assert proc.stdout.startswith("# reproduce-cpu")
    assert "| No Normalization | None | None | L2 | None | 28.3 |" in proc.stdout
    assert "trial " in proc.stderr and "2 trials" in proc.stderr

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["variant"], r["seeds"], r["epochs"]) for r in rows] == [
        ("no_norm", "1", "2"),
        ("random", "1", "0"),  # the floor trains no epochs
    ]
    for row in rows:
        assert 0 < float(row["linear_top1_mean"]) <= 100
        assert -1 <= float(row["cos_neg"]) <= 1 and row["collapsed"] in ("True", "False")
    assert rows[0]["linear_top1_std"] == rows[1]["linear_top1_std"] == ""  # one seed each
    assert (out / "figures" / "linear_eval.png").stat().st_size > 10_000

    client = MlflowClient(mlflow_server)
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`byol.kind` = 'sweep'",
    )
    assert parent.info.status == "FINISHED"
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.md", "figures"} <= top
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert figures == {"figures/linear_eval.png", "figures/collapse.png"}
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert sorted(r.data.params["variant"] for r in children) == ["no_norm", "random"]


def test_bad_options_are_one_line_errors(tmp_path):
    for args, message in [
        (["--variants", "byol,bogus"], "byol: error: --variants: unknown variant or group 'bogus'"),
        (["--data", "shapes", "--set", "optim.lr=-1"], "byol: error: base.optim.lr:"),
        (["--data", "shapes", "--epochs", "-2"], "byol: error: base.epochs:"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "byol_core.cli", "reproduce", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert proc.stderr.startswith(message), proc.stderr
