"""Accepting updates: every check that needs no state, then a version and a place in the queue.

Runs on the API's worker threads. The source, every header against the model (names, shapes,
dtypes, offsets) are checked before anything is allocated; the data itself (NaN/Inf) is read
once, by the pipeline, which rejects the version with the reason if it finds any. An
Idempotency-Key replays the first answer before any work.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import BadRequest, Conflict
from orchestrator.service import tensor_source
from orchestrator.service.model_spec import ModelSpec
from orchestrator.service.sources import (
    UploadSink,
    WeightFiles,
    check_header,
    inspect_files,
    resolve_path_source,
)
from orchestrator.service.staged import StagedSources
from orchestrator.service.updates import UpdateQueue, UpdateRecord
from orchestrator.settings import Settings


def request_digest(body: dict[str, Any]) -> str:
    """A stable digest of a request body, for Idempotency-Key comparison."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class Submissions:
    """The door: validate, then enqueue (or replay)."""

    def __init__(
        self,
        settings: Settings,
        queue: UpdateQueue,
        model: ModelSpec | None,
        *,
        staged: StagedSources,
        device: torch.device,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.model = model
        self.staged = staged
        self.device = device
        self.uploads_dir = settings.resolved_data_dir() / "uploads"

    def require_model(self) -> ModelSpec:
        if self.model is None:
            raise Conflict(
                "model.config is not set: refitd needs the model's config.json to check, plan, "
                "quantize and verify updates (set REFITD_MODEL__CONFIG)"
            )
        return self.model

    def validate(self, files: WeightFiles) -> None:
        """Every check that needs no state and reads no tensor data: headers against the model."""
        model = self.require_model()
        header = inspect_files(files, max_tensors=self.settings.limits.max_tensors)
        check_header(header, model.expected)

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

    def submit_tensors(
        self,
        source: dict[str, Any],
        *,
        label: str | None,
        verify: bool | None,
        idempotency_key: str | None,
    ) -> tuple[UpdateRecord, bool]:
        """A trainer's tensors on this host (service/tensor_source.py): checked, copied into
        the daemon's memory, then enqueued; the copy waits in `staged` for the pipeline."""
        verify = self.settings.verification.enabled if verify is None else verify
        # The content, not the handles: a retry re-exports the same tensors under new handles
        # (another pid, other buffers), and must replay the first answer, not be refused.
        content = [{"tensors": b["tensors"], "digest": b["digest"]} for b in source["buckets"]]
        digest = request_digest(
            {"source": {"type": source["type"], "buckets": content}, "label": label,
             "verify": verify}
        )  # fmt: skip
        replay = self._replay(idempotency_key, digest)
        if replay is not None:
            return replay, False
        model = self.require_model()
        tensor_source.check_exporter(source["exporter"])
        tables = tensor_source.bucket_tables(
            source["buckets"], max_tensors=self.settings.limits.max_tensors
        )
        check_header(tensor_source.header_of(tables), model.expected)
        update_id = uuid.uuid4().hex
        self.staged.reserve(update_id)
        try:
            shards = tensor_source.copy_buckets(source, tables, device=self.device)
            # Before the queue: the worker may take the update the moment it is queued.
            self.staged.fill(update_id, shards)
            del shards
            record, created = self.queue.submit(
                source=tensor_source.recorded(source, tables),
                label=label,
                verify=verify,
                idempotency_key=idempotency_key,
                body_digest=digest,
                update_id=update_id,
            )
        except BaseException:
            self.staged.drop(update_id)
            raise
        if not created:  # the same key and body, recorded meanwhile by another request
            self.staged.drop(update_id)
        return record, created

    def open_upload(self) -> UploadSink:
        self.require_model()
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


def source_files(settings: Settings, source: dict[str, Any], update_id: str) -> WeightFiles:
    """The files of a queued update's source (re-resolved: a path may have changed)."""
    from orchestrator.errors import InvalidUpdate

    if source["type"] == "path":
        return resolve_path_source(source["path"], settings.sources.allowed_roots)
    path = Path(source["file"])
    if not path.exists():
        raise InvalidUpdate(f"the uploaded file of update {update_id} is gone")
    return WeightFiles((path,))
