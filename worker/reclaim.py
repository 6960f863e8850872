"""Give back the placement group of a Ray Train run whose controller died.

Ray Train V2 reserves a run's workers in a placement group that lives as long as the Ray *job*,
not as long as the controller that created it. A controller that dies without shutting down —
its Tune trial stopped early by ASHA, its sweep or job cancelled by force — leaves the
reservation behind, and on a small machine the next trial then waits for CPUs forever. Ray's own
cleaner (``PlacementGroupCleaner``) asks the dashboard's state API whether the controller lives,
and this project installs Ray without the dashboard, so that cleaner never acts (runs leave it
out: ``worker.ray_train.LeanTorchTrainer``).

Here the controller registers its placement group with one janitor actor per cluster (detached,
so it outlives the runs it watches), which pings the controller every second and removes the
group once the controller is gone.

It registers the group the moment Ray Train creates it, not once the workers have started:
starting them takes seconds (4-6 s on 2 cores), and a controller killed in between leaked its
group. A cancelled sweep did exactly that: the force-kill reached the trial's worker first, the
still-living controller retried with a new group, and died while that group's worker started.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.train.v2._internal.execution.worker_group import worker_group as worker_group_module
from ray.util.placement_group import PlacementGroup, remove_placement_group

if TYPE_CHECKING:
    from ray.train.v2._internal.execution.worker_group import WorkerGroup, WorkerGroupContext

log = logging.getLogger(__name__)

JANITOR = "byol-placement-group-janitor"
NAMESPACE = "byol"


class Janitor:
    """Watches (placement group, owner) pairs, the owner being the actor the group serves (a
    Train controller, a Tune trial); removes a group whose owner died."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self.watched: list[tuple[PlacementGroup, ActorHandle]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, name="janitor", daemon=True).start()

    def watch(self, group: PlacementGroup, owner: ActorHandle) -> None:
        with self.lock:
            if all(group.id != watched.id for watched, _ in self.watched):
                self.watched.append((group, owner))

    def watching(self) -> int:
        with self.lock:
            return len(self.watched)

    def _loop(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.every):
            with self.lock:
                pairs = list(self.watched)
            done = [pair for pair in pairs if self._settled(*pair)]
            with self.lock:
                self.watched = [pair for pair in self.watched if pair not in done]

    def _settled(self, group: PlacementGroup, owner: ActorHandle) -> bool:
        """True once ``group`` needs no more watching: removed, or removed here."""
        try:
            state = ray.util.placement_group_table(group).get("state", "REMOVED")
        except Exception:  # the GCS blinking: look again next round
            return False
        if state == "REMOVED":
            return True
        ping = owner.__ray_ready__.remote()
        ready, _ = ray.wait([ping], timeout=self.every)
        if not ready:
            return False  # alive and busy
        try:
            ray.get(ready[0])
            return False
        except RayActorError:
            pass
        log.warning("the actor of placement group %s died; removing the group", group.id)
        try:
            remove_placement_group(group)
        except Exception as exc:
            log.warning("placement group %s not removed: %s", group.id, exc)
            return False
        return True


def janitor() -> ActorHandle:
    """The cluster's janitor, started on first use (0 CPU, on the head node)."""
    return (
        ray.remote(Janitor)
        .options(
            name=JANITOR,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            # The head node lives as long as the cluster; and not in the placement group of
            # the Tune trial that may be starting it (Tune trials capture their children).
            resources={"node:__internal_head__": 0.001},
            scheduling_strategy="DEFAULT",
            max_restarts=-1,
        )
        .remote()
    )


def watch(group: PlacementGroup) -> None:
    """Has the janitor remove ``group`` once the actor this runs in is gone (a Train controller
    for its workers' group, a Tune trial for the trial's own)."""
    owner = ray.get_runtime_context().current_actor
    try:
        ray.get(janitor().watch.remote(group, owner), timeout=60)
    except Exception as exc:  # training goes on; only a later kill would leak the group
        log.warning("placement group %s not watched: %s", group.id, exc)


def watch_on_creation() -> None:
    """Makes Ray Train's worker groups in this process register their placement group with the
    janitor as soon as it is created. Where this Ray no longer creates it through the module's
    ``placement_group``, says so; the group is then watched once the workers have started."""
    create = getattr(worker_group_module, "placement_group", None)
    if create is None:
        log.warning("Ray Train's placement groups are watched only once their workers started")
        return
    if getattr(create, "byol_watched", False):
        return

    @functools.wraps(create)
    def create_and_watch(*args: Any, **kwargs: Any) -> PlacementGroup:
        group = create(*args, **kwargs)
        watch(group)
        return group

    create_and_watch.byol_watched = True  # type: ignore[attr-defined]
    worker_group_module.placement_group = create_and_watch


class ReclaimPlacementGroup(WorkerGroupCallback):
    """A Ray Train run callback: registers each worker group's placement group with the
    janitor. It runs in the Train controller, which is what the janitor then watches."""

    def before_worker_group_start(self, worker_group_context: WorkerGroupContext) -> None:
        watch_on_creation()

    def after_worker_group_start(self, worker_group: WorkerGroup) -> None:
        # Idempotent: the group is usually watched since its creation already.
        watch(worker_group.get_worker_group_state().placement_group_handle.placement_group)
