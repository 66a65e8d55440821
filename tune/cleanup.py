"""Give back the workers' resources of trials that Tune ended early.

When ASHA stops a trial, Tune ends the trial's actor, and with it the Ray Train controller that
actor owns. The controller's worker placement group is scoped to the job (Ray removes a
non-detached group only once both its creator actor and its job are gone), so Ray Train V2
starts a detached ``PlacementGroupCleaner`` that watches the controller through the State API
and removes the group. That watcher resolves the cluster by auto-detection, which fails when
one host runs several Ray instances ("Found multiple active Ray instances": a shared dev box
or CI runner), and then every early-stopped trial keeps its workers' CPUs/GPUs reserved until
the sweep ends: later trials wait for resources that never come back.

The driver therefore applies the actor-scoped rule itself: a placement group of this job whose
creator was an actor that has died is removed. Groups created by the driver (Tune's own trial
groups) have no creator actor and are never touched, nor are detached groups or other jobs'.
This reads the GCS placement-group table through Ray's internal accessor; if that interface
changes, the sweep logs one warning and goes on without the safety net.
"""

from __future__ import annotations

import logging
import time

import ray
from ray._private.state import state
from ray.core.generated import gcs_pb2
from ray.util.placement_group import PlacementGroup, remove_placement_group

_log = logging.getLogger(__name__)


class OrphanedGroupReaper:
    """Removes this job's placement groups whose creator actor died; at most once per ``every_s``."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.removed: list[str] = []
        self._last = 0.0
        self._broken = False

    def __call__(self, force: bool = False) -> int:
        if self._broken or (not force and time.monotonic() - self._last < self.every_s):
            return 0
        self._last = time.monotonic()
        try:
            return self._sweep()
        except Exception as exc:  # an internal Ray interface changed: warn once, run without the net
            self._broken = True
            _log.warning("could not scan placement groups for early-stopped trials (%s); their resources "
                         "are released when their creator's cleanup runs or the sweep ends", exc)
            return 0

    def _sweep(self) -> int:
        job = ray.get_runtime_context().get_job_id()
        count = 0
        for blob in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
            if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached:
                continue
            if not pg.creator_actor_dead or ray.ActorID(pg.creator_actor_id).is_nil():
                continue  # alive creator, or created by the driver (no creator actor)
            if ray.JobID(pg.creator_job_id).hex() != job:
                continue
            group_id = ray.PlacementGroupID(pg.placement_group_id)
            remove_placement_group(PlacementGroup(group_id))
            self.removed.append(group_id.hex())
            count += 1
        return count
