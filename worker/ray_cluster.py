"""Connecting to Ray: the cluster at ``RAY_ADDRESS``, or one Ray starts on this machine.

Kept apart from ``worker.ray_train`` so that the job worker connects without importing torch.
"""

from __future__ import annotations

import os
from typing import Any

import ray

# Ray Train starts a PreemptionWatcher actor for every training run, a process of its own that
# polls the cluster for nodes being drained (spot instances an autoscaler takes back). A cluster
# Ray starts on this machine is this one node, which nothing drains; the watcher would cost a
# Ray worker's start-up (2-3 CPU-seconds on a 2-core EPYC) per run, and per trial of a sweep.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def init_ray(**options: Any) -> None:
    """Connect to ``RAY_ADDRESS``, or start Ray on this machine, unless connected already.
    ``options`` go to ``ray.init`` (the tests give a local cluster its CPUs)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # Read in Ray Train's controller process, which inherits this environment through the
        # raylet that ray.init starts here. A cluster it finds instead (one `ray start` left
        # on this machine) or one reached by address keeps its own setting.
        os.environ.setdefault(PREEMPTION_WATCHER, "0")
    # Worker output stays in Ray's session logs: a failed run ends in one line that points
    # there, not in every worker's traceback repeated on the console.
    ray.init(address=address, include_dashboard=False, log_to_driver=False, **options)
