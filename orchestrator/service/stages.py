"""One update, stage by stage: load -> quantize and shard -> verify -> roll out -> artifact.

The hot path never touches disk or a CPU hash after the source is read:
- loading: the source's files are read once (no mmap) into a pinned staging pool the daemon
  keeps, and copied to the GPU bucket by bucket while the next bucket is read; NaN/Inf is found
  there, on the device, and rejects the version with the reason;
- quantizing: the whole model in a few kernel launches, cut by the TP plan into one flat buffer
  per rank (a {name, dtype, shape, offset} table over it) and a GPU digest of each;
- verifying: the very per-rank buffers that will ship, against the bf16 update;
- rolling out: the 2PC, with each rank on this host copying its buffer by CUDA IPC (shared
  memory for CPU ranks); other hosts read the artifact, which is then written first;
- the artifact (safetensors + sha256, fsynced) is written after the commit when the durability
  rule allows (service/artifact_writer.py), else before the rollout (stage `writing`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from kernels.finite import find_non_finite
from orchestrator import failpoints
from orchestrator.data.files import StagingPool, read_safetensors
from orchestrator.data.flat import FlatShard, pack
from orchestrator.errors import InvalidUpdate, RefitError
from orchestrator.metrics import Metrics
from orchestrator.rollout.coordinator import Coordinator
from orchestrator.service.artifact_writer import ArtifactWriter
from orchestrator.service.model_spec import ModelSpec
from orchestrator.service.sources import check_header, inspect_files
from orchestrator.service.staged import StagedSources, tensors_of
from orchestrator.service.submission import source_files
from orchestrator.service.tensor_source import TENSOR_SOURCE
from orchestrator.service.updates import Stage, UpdateQueue, UpdateRecord
from orchestrator.settings import Settings
from orchestrator.state.artifacts import ArtifactStore, layout_record
from orchestrator.state.versions import VersionStatus, VersionStore
from orchestrator.text import some

log = logging.getLogger("refitd.pipeline")


class UpdateStages:
    """Runs the stages of one update at a time; keeps what is reused across updates (the
    staging pool, the verifier's model, the drift baseline)."""

    def __init__(
        self,
        *,
        settings: Settings,
        queue: UpdateQueue,
        versions: VersionStore,
        artifacts: ArtifactStore,
        coordinator: Coordinator,
        metrics: Metrics,
        model: ModelSpec | None,
        staged: StagedSources,
    ) -> None:
        self.settings = settings
        self.staged = staged
        self.queue = queue
        self.versions = versions
        self.artifacts = artifacts
        self.coordinator = coordinator
        self.metrics = metrics
        self.model = model
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        data = settings.data_path
        self.pool = StagingPool(
            bucket_bytes=data.staging_bucket_mb << 20, buckets=data.staging_buckets
        )
        self.writer = ArtifactWriter(artifacts, versions, StagingPool(
            bucket_bytes=data.staging_bucket_mb << 20, buckets=2))  # fmt: skip
        self._previous_bf16: dict[str, torch.Tensor] | None = None
        self._verifier: Any = None
        # Each stage's seconds of the update being run (benchmarks and logs read them).
        self.timings: dict[str, float] = {}

    def forget_drift_baseline(self) -> None:
        """After a rollback the kept bf16 weights are no longer the active version's."""
        self._previous_bf16 = None

    @contextlib.contextmanager
    def _stage(self, record: UpdateRecord, stage: Stage) -> Iterator[None]:
        self.queue.set_stage(record.update_id, stage)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            # A stage that rejects or aborts the update took its time too.
            seconds = time.perf_counter() - t0
            self.timings[stage.value] = seconds
            self.metrics.stage_seconds.labels(stage.value).observe(seconds)

    def run(self, record: UpdateRecord, *, fence: int) -> None:
        """Drive `record` to COMMITTED; raises InvalidUpdate (rejected) or RolloutAborted."""
        from orchestrator.model.planner import plan_model
        from orchestrator.model.sharding import quantize_state, shard_views

        model = self._model()
        version = record.version
        self.timings = {}
        with self._stage(record, Stage.LOADING):
            failpoints.hit("pipeline.loading")
            if record.source["type"] == TENSOR_SOURCE:
                state = self._staged_state(record)
            else:
                files = source_files(self.settings, record.source, record.update_id)
                # Re-checked here: a path source may have changed since it was accepted.
                header = inspect_files(files, max_tensors=self.settings.limits.max_tensors)
                check_header(header, model.expected)
                state = read_safetensors(
                    files.files,
                    device=self.device,
                    pool=self.pool,
                    threads=self.settings.data_path.reader_threads,
                ).tensors
            bad = find_non_finite(state)
            if bad:
                raise InvalidUpdate(f"NaN or Inf in {some(bad)}; nothing was applied")

        with self._stage(record, Stage.QUANTIZING):
            plan = plan_model(
                {name: tuple(t.shape) for name, t in state.items()},
                self.settings.ranks.tp_size,
                config=model.config,
                ignore=self.settings.quantization.ignore,
            )
            quantized = quantize_state(state, plan)
            shards = [pack(view, device=self.device) for view in shard_views(quantized, plan)]
            del quantized
            self.versions.set_fields(
                version, quantization=plan.report(), layout=layout_record(shards)
            )
            self.metrics.fallbacks.inc(len(plan.fallbacks()))
            self.versions.transition(version, VersionStatus.QUANTIZED)

        if record.verify:
            with self._stage(record, Stage.VERIFYING):
                self._verify(record, model, state, shards, plan)

        if self.settings.verification.drift.enabled:
            self._previous_bf16 = {n: t.to(torch.bfloat16) for n, t in state.items()}
        # The bf16 update is no longer needed: free it before the ranks stage their copies.
        del state

        metadata = {"label": record.label or "", "tp_size": str(plan.tp_size)}
        # At most one version without durable bytes: the previous one's write must be done.
        self.writer.wait()
        write_first = self._needs_artifact_first()
        if write_first:
            with self._stage(record, Stage.WRITING):
                self.writer.write_now(version, shards, metadata)

        with self._stage(record, Stage.ROLLING_OUT):
            self.coordinator.rollout(version, fence=fence, shards=shards, prune=False)

        # Committed: the trainer hears it now; the artifact follows (README "Durability").
        self.queue.finish(record.update_id, ok=True, stage=Stage.COMMITTED, error=None)
        self.metrics.updates.labels("committed").inc()
        self.metrics.active_version.set(version)
        if write_first:
            drop_upload(record)
            self.coordinator.retention.prune_quietly()
        else:
            # Measured on the H200: deleting a 9 GB artifact while the next update ran slowed its
            # 2PC tenfold (the AOF's fsyncs wait behind the filesystem), so old versions are
            # pruned right after this commit, before this version's artifact is written.
            self.writer.submit(
                version, shards, metadata,
                before=self.coordinator.retention.prune_quietly, then=lambda: drop_upload(record),
            )  # fmt: skip
        log.info("version %d committed on %d ranks (%s)", version, plan.tp_size,
                 ", ".join(f"{k} {v:.3f}s" for k, v in self.timings.items()))  # fmt: skip

    def _staged_state(self, record: UpdateRecord) -> dict[str, torch.Tensor]:
        """A tensor source's copy, made at the door on this device: no disk, no second copy."""
        shards = self.staged.take(record.update_id)
        if shards is None:
            # Recovery aborts such updates after a restart; a running daemon never loses one.
            raise RefitError(
                f"the in-memory source of update {record.update_id} is not held by this daemon; "
                "push the update again"
            )
        return dict(tensors_of(shards))

    def _needs_artifact_first(self) -> bool:
        """Whether the durability rule wants the artifact before the rollout: no durable
        fallback to return to (no active version with a durable artifact, or ranks that keep no
        resident previous version), or a rank that will read the artifact."""
        if not self.settings.ranks.keep_previous:
            return True
        active = self.coordinator.ledger.active_version()
        if active is None or not self.artifacts.exists(active):
            return True
        return bool(self.coordinator.routes.needs_artifact())

    def _model(self) -> ModelSpec:
        if self.model is None:
            raise InvalidUpdate("model.config is not set (REFITD_MODEL__CONFIG)")
        return self.model

    def _verify(
        self,
        record: UpdateRecord,
        model: ModelSpec,
        state: dict[str, torch.Tensor],
        shards: list[FlatShard],
        plan: Any,
    ) -> None:
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
        report = verify(
            model.config,
            state,
            [shard.views() for shard in shards],
            plan,
            probe,
            Thresholds(**cfg.thresholds.model_dump()),
            previous_state=self._previous_bf16 if drift else None,
            drift=drift,
            device=self.device,
        )
        details = report.to_dict()
        if cfg.drift.enabled and self._previous_bf16 is None:
            # The baseline lives in memory only (a full bf16 copy of the model).
            details["drift"] = (
                "skipped: no previous bf16 weights in memory (the first update since the daemon "
                "started or since a rollback)"
            )
        self.versions.set_fields(record.version, verification=details)
        if not report.passed:
            raise InvalidUpdate(f"verification failed: {report.reason}")
        self.versions.transition(record.version, VersionStatus.VERIFIED)


def drop_upload(record: UpdateRecord) -> None:
    """Delete an update's uploaded bytes once nothing needs them (the version's artifact is
    durable, or the update failed): a rollback reads the artifact, never the upload."""
    from pathlib import Path

    if record.source.get("type") == "upload":
        Path(record.source["file"]).unlink(missing_ok=True)
