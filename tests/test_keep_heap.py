"""runtime.keep_heap: training steps stop page-faulting their activations in again every step
(glibc). Each case in a fresh process, since malloc's settings last for the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

# BYOL steps of the cpu preset's network, both views in one pass (the global-BN path, whose
# larger activation blocks glibc hands back to the system most): page faults of steps 4-8.
SCRIPT = """
import resource, sys
import torch
from byol_core.ema import ema_update
from byol_core.presets import resolve_spec
from byol_core.runtime import keep_heap, resolve_runtime
from byol_core.trainer import build, train_step

torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_heap()
spec = resolve_spec(overrides=["batch_size=128"])
runtime = resolve_runtime(spec.runtime, torch.device("cpu"))
views = [torch.randn(128, 3, 32, 32) for _ in range(2)]
model, loss_fn, optimizer = build(spec, runtime.device)
model.to(memory_format=torch.channels_last)
model.online.view_passes = model.target.view_passes = "one"
faults = 0
for step in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_step(model.online, model.target, loss_fn, optimizer, views, runtime)
    ema_update(*model.target_pairs(), 0.99)
    if step >= 3:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def page_faults_of_five_steps(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_training_steps_reuse_their_memory_instead_of_faulting_it_in():
    plain = page_faults_of_five_steps("plain")
    kept = page_faults_of_five_steps("keep")
    print(f"\npage faults in 5 steps: {plain} as malloc comes, {kept} with keep_heap")
    # Measured here: 16,000-34,000 a step as malloc comes (64-130 MB), 0-3,300 kept.
    assert plain > 20_000
    assert kept < plain / 4
