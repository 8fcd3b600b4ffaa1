"""The worker thread: takes queued updates one at a time and drives each to a recorded end.

Every outcome is recorded on the update and its version: COMMITTED, REJECTED (bad content,
failed verification) or ABORTED (a rank failed to prepare, the lock stayed busy, an error). An
update whose version was committed is never reported failed, whatever happened after the
decision. A rollback holds the worker back (`hold`) so it runs between updates.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from orchestrator.errors import InvalidUpdate, LockHeld, RefitError, RolloutAborted
from orchestrator.metrics import Metrics
from orchestrator.rollout.lock import UpdateLock
from orchestrator.service.stages import UpdateStages, drop_upload
from orchestrator.service.updates import Stage, UpdateQueue, UpdateRecord
from orchestrator.settings import Settings
from orchestrator.state.redis_client import REDIS_DOWN, OutageLog
from orchestrator.state.versions import EVER_COMMITTED, VersionStatus, VersionStore

log = logging.getLogger("refitd.pipeline")

# What taking from the queue raises while Redis is down: the worker waits it out, never dies of it.
_QUEUE_DOWN: tuple[type[BaseException], ...] = (RefitError, *REDIS_DOWN)


class UpdateWorker:
    """One thread running queued updates under the update lock."""

    def __init__(
        self,
        *,
        settings: Settings,
        queue: UpdateQueue,
        versions: VersionStore,
        stages: UpdateStages,
        lock_factory: Callable[..., UpdateLock],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.versions = versions
        self.stages = stages
        self.lock_factory = lock_factory
        self.metrics = metrics
        self._stop = threading.Event()
        self._holds = 0
        self._holds_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="refitd-pipeline", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """While held, the worker starts no new update (a rollback waits for its turn)."""
        with self._holds_lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._holds_lock:
                self._holds -= 1

    def _loop(self) -> None:
        outage = OutageLog(log, "the update queue")
        while not self._stop.is_set():
            if self._holds:
                time.sleep(0.05)
                continue
            try:
                update_id = self.queue.take(timeout_s=0.5)
            except _QUEUE_DOWN as exc:  # Redis down: readiness says so; logged once
                outage.failed(exc)
                self._stop.wait(1.0)
                continue
            outage.recovered()
            if update_id is None:
                continue
            try:
                self.run(update_id)
            except Exception:
                log.exception("update %s failed unexpectedly", update_id)
            finally:
                # A trainer's tensors held for it (a whole model) go, whatever ended the run:
                # an error before the loading stage took them would hold them until the daemon
                # stops, and refuse every later tensor push (limits.tensor_updates_waiting).
                self.stages.staged.drop(update_id)
            # Off the running list only once its record is final: if Redis failed mid-way, it
            # stays there, readiness reports it as stuck, and the next start's recovery closes it.
            with contextlib.suppress(Exception):
                if self.queue.get(update_id).final:
                    self.queue.done(update_id)
                self.metrics.queued.set(self.queue.waiting())

    def run(self, update_id: str) -> None:
        """Drive one update to its end; every outcome is recorded on the update and version."""
        record = self.queue.get(update_id)
        version = record.version
        started = time.perf_counter()
        # A rollback (or a starting daemon's recovery) may hold the lock: wait for it, as long as
        # a holder can keep it (a live one: its deadlines; a dead one: until its TTL runs out),
        # rather than drop an update that was acknowledged.
        rollout = self.settings.rollout
        wait_s = rollout.lock_ttl_s + rollout.prepare_deadline_s + rollout.commit_deadline_s
        lock = self.lock_factory(timeout_s=wait_s)
        try:
            lock.acquire()
        except LockHeld as exc:
            message = f"the update lock stayed busy for {wait_s:g}s ({exc.message}); push it again"
            self._fail(record, Stage.ABORTED, message, VersionStatus.ABORTED, "aborted")
            return
        try:
            assert lock.fence is not None
            self.stages.run(record, fence=lock.fence)
        except RolloutAborted as exc:
            self._fail(record, Stage.ABORTED, exc.message, None, "aborted")
        except InvalidUpdate as exc:
            self._fail(record, Stage.REJECTED, exc.message, VersionStatus.REJECTED, "rejected")
        except Exception as exc:
            message = exc.message if isinstance(exc, RefitError) else f"{type(exc).__name__}: {exc}"
            log.exception("update %s (version %d) failed", update_id, version)
            self._fail(record, Stage.ABORTED, message, VersionStatus.ABORTED, "failed")
        finally:
            lock.release()
        log.info("update %s (version %d) finished in %.2fs", update_id, version,
                 time.perf_counter() - started)  # fmt: skip

    def _fail(
        self,
        record: UpdateRecord,
        stage: Stage,
        message: str,
        to: VersionStatus | None,
        outcome: str,
    ) -> None:
        if to is not None:
            with contextlib.suppress(RefitError):
                self.versions.transition(record.version, to, reason=message)
        # An error after the COMMIT decision (a timeout waiting for acks, say) leaves the version
        # committed: the update succeeded, and saying otherwise would make the trainer retry.
        if self.versions.get(record.version).status in EVER_COMMITTED:
            log.warning("version %d is committed although the pipeline then failed: %s",
                        record.version, message)  # fmt: skip
            self.queue.finish(record.update_id, ok=True, stage=Stage.COMMITTED, error=None)
            self.metrics.updates.labels("committed").inc()
            return
        drop_upload(record)
        self.stages.staged.drop(record.update_id)
        self.queue.finish(record.update_id, ok=False, stage=stage, error=message)
        self.metrics.updates.labels(outcome).inc()
        log.warning("version %d %s: %s", record.version, stage.value, message)
