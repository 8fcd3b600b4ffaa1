"""The update pipeline as the API and the daemon see it: the door, the worker, the stages.

Wiring only; each job has its module: submission.py (checks and enqueueing), worker.py (one
update at a time under the lock, outcomes recorded), stages.py (the data path of one update),
artifact_writer.py (durability), recovery.py (what a restart finishes).
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.metrics import Metrics
from orchestrator.rollout.coordinator import Coordinator
from orchestrator.rollout.lock import UpdateLock
from orchestrator.service.model_spec import ModelSpec
from orchestrator.service.staged import StagedSources
from orchestrator.service.stages import UpdateStages
from orchestrator.service.submission import Submissions
from orchestrator.service.updates import UpdateQueue
from orchestrator.service.worker import UpdateWorker
from orchestrator.settings import Settings
from orchestrator.state.artifacts import ArtifactStore
from orchestrator.state.versions import VersionStore


class UpdatePipeline:
    """Accepts updates and runs them, one at a time, to COMMITTED or to a recorded failure."""

    def __init__(
        self,
        *,
        settings: Settings,
        queue: UpdateQueue,
        versions: VersionStore,
        artifacts: ArtifactStore,
        coordinator: Coordinator,
        lock_factory: Callable[..., UpdateLock],
        metrics: Metrics,
        model: ModelSpec | None,
    ) -> None:
        self.queue = queue
        # Trainer tensors copied at the door, waiting for the pipeline (service/staged.py).
        self.staged = StagedSources(settings.limits.tensor_updates_waiting)
        self.stages = UpdateStages(
            settings=settings, queue=queue, versions=versions, artifacts=artifacts,
            coordinator=coordinator, metrics=metrics, model=model, staged=self.staged,
        )  # fmt: skip
        self.submissions = Submissions(
            settings, queue, model, staged=self.staged, device=self.stages.device
        )
        self.worker = UpdateWorker(
            settings=settings, queue=queue, versions=versions, stages=self.stages,
            lock_factory=lock_factory, metrics=metrics,
        )  # fmt: skip
        # The door, as the API calls it.
        self.submit_path = self.submissions.submit_path
        self.open_upload = self.submissions.open_upload
        self.submit_upload = self.submissions.submit_upload
        self.submit_tensors = self.submissions.submit_tensors
        self.hold = self.worker.hold
        self.forget_drift_baseline = self.stages.forget_drift_baseline

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop taking updates, and let a background artifact write finish (bounded): a version
        committed just before the stop should be durable when the daemon exits."""
        self.worker.stop(timeout_s)
        self.stages.writer.wait(timeout_s)
