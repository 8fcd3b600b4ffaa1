"""The update pipeline: load -> quantize and shard -> verify -> write artifacts -> 2PC rollout.

Submission (on the API's worker threads) checks everything that can be checked without changing
state: the source, every header against the model, NaN/Inf. Only then is a version allocated and
the update queued. One worker thread runs queued updates one at a time, under the update lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kernels.finite import find_non_finite
from orchestrator.errors import (
    BadRequest,
    Conflict,
    InvalidUpdate,
    LockHeld,
    RefitError,
    RolloutAborted,
)
from orchestrator.metrics import Metrics
from orchestrator.service.sources import (
    UploadSink,
    WeightFiles,
    check_header,
    inspect_files,
    load_tensors,
    resolve_path_source,
    scan_non_finite,
)
from orchestrator.service.updates import Stage, UpdateQueue, UpdateRecord
from orchestrator.settings import Settings
from orchestrator.state.versions import FINAL_FAILURES, VersionStatus, VersionStore
from orchestrator.text import some

log = logging.getLogger("refitd.pipeline")

_EVER_COMMITTED = frozenset(
    {VersionStatus.COMMITTED, VersionStatus.SUPERSEDED, VersionStatus.ROLLED_BACK}
)


@dataclass(frozen=True)
class ModelSpec:
    """What refitd knows of the served model: its config.json and the tensors an update carries."""

    config: dict[str, Any]
    expected: dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]
    path: Path

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        from orchestrator.model.verification import expected_tensors

        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise RefitError(f"model.config {path} cannot be read as JSON: {exc}") from None
        expected = {
            name: (tuple(shape), tuple(dtypes) if isinstance(dtypes, tuple) else (dtypes,))
            for name, (shape, dtypes) in expected_tensors(config).items()
        }
        return cls(config=config, expected=expected, path=Path(path))


def request_digest(body: dict[str, Any]) -> str:
    """A stable digest of a request body, for Idempotency-Key comparison."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class UpdatePipeline:
    """Accepts updates and runs them, one at a time, to COMMITTED or to a recorded failure."""

    def __init__(
        self,
        *,
        settings: Settings,
        queue: UpdateQueue,
        versions: VersionStore,
        artifacts: Any,
        coordinator: Any,
        lock_factory: Any,
        metrics: Metrics,
        model: ModelSpec | None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.versions = versions
        self.artifacts = artifacts
        self.coordinator = coordinator
        self.lock_factory = lock_factory
        self.metrics = metrics
        self.model = model
        self.uploads_dir = settings.resolved_data_dir() / "uploads"
        self._stop = threading.Event()
        self._holds = 0
        self._holds_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._previous_bf16: dict[str, torch.Tensor] | None = None
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # Submission ------------------------------------------------------------------------------
    def _require_model(self) -> ModelSpec:
        if self.model is None:
            raise Conflict(
                "model.config is not set: refitd needs the model's config.json to check, plan, "
                "quantize and verify updates (set REFITD_MODEL__CONFIG)"
            )
        return self.model

    def validate(self, files: WeightFiles) -> None:
        """Every check that needs no state: headers against the model, then NaN/Inf."""
        model = self._require_model()
        header = inspect_files(files, max_tensors=self.settings.limits.max_tensors)
        check_header(header, model.expected)
        scan_non_finite(files)

    def submit_path(
        self,
        path: str,
        *,
        label: str | None,
        verify: bool | None,
        idempotency_key: str | None,
    ) -> tuple[UpdateRecord, bool]:
        verify = self.settings.verification.enabled if verify is None else verify
        body = {"source": {"type": "path", "path": path}, "label": label, "verify": verify}
        digest = request_digest(body)
        replay = self._replay(idempotency_key, digest)
        if replay is not None:
            return replay, False
        files = resolve_path_source(path, self.settings.sources.allowed_roots)
        self.validate(files)
        return self.queue.submit(
            source={"type": "path", "path": path},
            label=label,
            verify=verify,
            idempotency_key=idempotency_key,
            body_digest=digest,
        )

    def open_upload(self) -> UploadSink:
        self._require_model()
        return UploadSink(
            self.uploads_dir,
            f"upload-{time.time_ns()}",
            max_bytes=self.settings.limits.max_upload_bytes,
        )

    def submit_upload(
        self,
        sink: UploadSink,
        *,
        label: str | None,
        verify: bool | None,
        idempotency_key: str | None,
    ) -> tuple[UpdateRecord, bool]:
        """Finish a streamed upload, validate it, and enqueue it (the file then belongs to the
        update; a refused or replayed upload's file is removed)."""
        verify = self.settings.verification.enabled if verify is None else verify
        try:
            sha = sink.finish()
            digest = request_digest(
                {"source": {"type": "upload", "sha256": sha}, "label": label, "verify": verify}
            )
            replay = self._replay(idempotency_key, digest)
            if replay is not None:
                sink.path.unlink(missing_ok=True)
                return replay, False
            self.validate(WeightFiles((sink.path,)))
            record, created = self.queue.submit(
                source={"type": "upload", "sha256": sha, "bytes": sink.size,
                        "file": str(sink.path)},
                label=label,
                verify=verify,
                idempotency_key=idempotency_key,
                body_digest=digest,
            )  # fmt: skip
        except BaseException:
            sink.discard()
            sink.path.unlink(missing_ok=True)
            raise
        if not created:
            sink.path.unlink(missing_ok=True)
        return record, created

    def _replay(self, idempotency_key: str | None, digest: str) -> UpdateRecord | None:
        """The first answer for a replayed key (checked before any work), else None."""
        if idempotency_key is None:
            return None
        if not idempotency_key or len(idempotency_key) > 200:
            raise BadRequest("Idempotency-Key must be 1 to 200 characters")
        return self.queue.lookup_idempotent(idempotency_key, digest)

    # The worker ----------------------------------------------------------------------------
    def start(self) -> None:
        self._worker = threading.Thread(target=self._loop, name="refitd-pipeline", daemon=True)
        self._worker.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout_s)

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

    def forget_drift_baseline(self) -> None:
        """After a rollback the kept bf16 weights are no longer the active version's."""
        self._previous_bf16 = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._holds:
                time.sleep(0.05)
                continue
            try:
                update_id = self.queue.take(timeout_s=0.5)
            except Exception:  # Redis down: keep trying, readiness reports it
                log.exception("cannot take the next update from the queue")
                time.sleep(1.0)
                continue
            if update_id is None:
                continue
            try:
                self.run(update_id)
            except Exception:
                log.exception("update %s failed unexpectedly", update_id)
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
            self._drop_upload(record)
            return
        try:
            self._run_stages(record, fence=lock.fence)
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
        self._drop_upload(record)
        log.info("update %s (version %d) finished in %.2fs", update_id, version,
                 time.perf_counter() - started)  # fmt: skip

    def _drop_upload(self, record: UpdateRecord) -> None:
        """Delete a final update's uploaded bytes: the version's artifacts hold what the ranks
        load, and a rollback reads those, so the upload (a whole checkpoint) is never read again."""
        if record.source.get("type") == "upload":
            Path(record.source["file"]).unlink(missing_ok=True)

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
        if self.versions.get(record.version).status in _EVER_COMMITTED:
            log.warning("version %d is committed although the pipeline then failed: %s",
                        record.version, message)  # fmt: skip
            self.queue.finish(record.update_id, ok=True, stage=Stage.COMMITTED, error=None)
            self.metrics.updates.labels("committed").inc()
            return
        self.queue.finish(record.update_id, ok=False, stage=stage, error=message)
        self.metrics.updates.labels(outcome).inc()
        log.warning("version %d %s: %s", record.version, stage.value, message)

    @contextlib.contextmanager
    def _stage(self, record: UpdateRecord, stage: Stage) -> Iterator[None]:
        self.queue.set_stage(record.update_id, stage)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            # A stage that rejects or aborts the update took its time too.
            self.metrics.stage_seconds.labels(stage.value).observe(time.perf_counter() - t0)

    def _run_stages(self, record: UpdateRecord, *, fence: int) -> None:
        from orchestrator.model.planner import plan_model
        from orchestrator.model.sharding import quantize_and_shard

        model = self._require_model()
        version = record.version
        with self._stage(record, Stage.LOADING):
            files = self._files(record)
            # Re-checked here: a path source may have changed since it was accepted.
            header = inspect_files(files, max_tensors=self.settings.limits.max_tensors)
            check_header(header, model.expected)
            state = {name: t.to(self._device) for name, t in load_tensors(files)}
            bad = find_non_finite(state)
            if bad:
                raise InvalidUpdate(f"NaN or Inf in {some(bad)}")

        with self._stage(record, Stage.QUANTIZING):
            plan = plan_model(
                {name: tuple(t.shape) for name, t in state.items()},
                self.settings.ranks.tp_size,
                config=model.config,
                ignore=self.settings.quantization.ignore,
            )
            shards = quantize_and_shard(state, plan)
            report = plan.report()
            self.versions.set_fields(version, quantization=report)
            self.metrics.fallbacks.inc(len(plan.fallbacks()))
            self.versions.transition(version, VersionStatus.QUANTIZED)

        if record.verify:
            with self._stage(record, Stage.VERIFYING):
                verification = self._verify(model, state, shards, plan)
                details = verification.to_dict()
                if self.settings.verification.drift.enabled and self._previous_bf16 is None:
                    # The baseline lives in memory only (a full bf16 copy of the model).
                    details["drift"] = (
                        "skipped: no previous bf16 weights in memory (the first update since "
                        "the daemon started or since a rollback)"
                    )
                self.versions.set_fields(version, verification=details)
                if not verification.passed:
                    raise InvalidUpdate(f"verification failed: {verification.reason}")
                self.versions.transition(version, VersionStatus.VERIFIED)

        with self._stage(record, Stage.WRITING):
            artifact = self.artifacts.write_version(
                version,
                shards,
                metadata={"label": record.label or "", "tp_size": str(plan.tp_size)},
            )
            self.versions.set_fields(version, artifact=artifact)
        del shards

        with self._stage(record, Stage.ROLLING_OUT):
            self.coordinator.rollout(version, fence=fence)

        if self.settings.verification.drift.enabled:
            self._previous_bf16 = {n: t.to(torch.bfloat16) for n, t in state.items()}
        self.queue.finish(record.update_id, ok=True, stage=Stage.COMMITTED, error=None)
        self.metrics.updates.labels("committed").inc()
        self.metrics.active_version.set(version)
        log.info("version %d committed on %d ranks", version, plan.tp_size)

    def _verify(self, model: ModelSpec, state: dict[str, torch.Tensor], shards: Any, plan: Any):
        from orchestrator.model.probe import probe_batch
        from orchestrator.model.verification import DriftThresholds, Thresholds, verify

        cfg = self.settings.verification
        probe = probe_batch(
            int(model.config["vocab_size"]),
            seed=cfg.probe.seed,
            count=cfg.probe.count,
            length=cfg.probe.length,
            token_ids=cfg.probe.token_ids,
        )
        drift = DriftThresholds(max_mean_kl=cfg.drift.max_mean_kl) if cfg.drift.enabled else None
        return verify(
            model.config,
            state,
            shards,
            plan,
            probe,
            Thresholds(**cfg.thresholds.model_dump()),
            previous_state=self._previous_bf16 if drift else None,
            drift=drift,
            device=self._device,
        )

    def _files(self, record: UpdateRecord) -> WeightFiles:
        source = record.source
        if source["type"] == "path":
            return resolve_path_source(source["path"], self.settings.sources.allowed_roots)
        path = Path(source["file"])
        if not path.exists():
            raise InvalidUpdate(f"the uploaded file of update {record.update_id} is gone")
        return WeightFiles((path,))

    # Recovery --------------------------------------------------------------------------------
    def recover(self) -> None:
        """After a restart: an update that was running when the daemon died is re-run if it had
        not changed its version yet, else closed with the version's outcome."""
        for update_id in self.queue.running():
            record = self.queue.get(update_id)
            status = self.versions.get(record.version).status
            if status is VersionStatus.RECEIVED:
                log.info("re-queueing update %s (version %d): the daemon stopped before it ran",
                         update_id, record.version)  # fmt: skip
                self.queue.requeue_front(update_id)
                continue
            if status in _EVER_COMMITTED:
                self.queue.finish(update_id, ok=True, stage=Stage.COMMITTED, error=None)
            else:
                if status not in FINAL_FAILURES:
                    with contextlib.suppress(RefitError):
                        self.versions.transition(
                            record.version, VersionStatus.ABORTED,
                            reason="the daemon restarted during this update; push it again",
                        )  # fmt: skip
                final = self.versions.get(record.version)
                stage = Stage.REJECTED if final.status is VersionStatus.REJECTED else Stage.ABORTED
                self.queue.finish(update_id, ok=False, stage=stage, error=final.reason)
            self._drop_upload(record)
            self.queue.done(update_id)
