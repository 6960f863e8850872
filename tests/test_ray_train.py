"""Data-parallel training on a real local Ray cluster, through the CLI as a user runs it."""

import json
import subprocess
import sys

from byol_core.checkpoint import load_checkpoint

TINY = [
    "data.train_limit=256",
    "data.eval_limit=200",
    "batch_size=64",
    "model.encoder.width=8",
    "model.projector.hidden_dim=64",
    "model.predictor.hidden_dim=64",
    "model.projection_dim=32",
]


def train(out, *extra: str) -> dict:
    args = [a for s in (*TINY, *extra) for a in ("--set", s)]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "byol_core.cli",
            "train",
            "--workers",
            "2",
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_workers_train_report_and_resume(tmp_path):
    first = train(tmp_path, "epochs=2")
    assert first["epochs"] == 2 and first["linear_top1"] is not None
    payload = load_checkpoint(first["checkpoint"])
    spec = json.loads(payload["spec"])
    assert spec["distributed"]["workers"] == 2 and spec["distributed"]["bn_sync"] == "global"
    history = json.loads(payload["history"])
    assert [m["epoch"] for m in history] == [1, 2]

    # Same run folder, more epochs: Ray Train restores the latest checkpoint and only epoch 3
    # runs. Epochs 1-2 are the first run's records, timings included, each exactly once.
    second = train(tmp_path, "epochs=3")
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["epoch"] for m in resumed] == [1, 2, 3]
    assert resumed[:2] == history
    assert second["epochs"] == 3
