"""Domain errors: one place, mapped to HTTP status codes by the API and to exit codes by the CLIs.

Plain Python on purpose: kernels, the planner and verification import this on machines that do not
have the service's dependencies.
"""

from __future__ import annotations

from typing import Any


class RefitError(Exception):
    """Base of every error refitd raises on purpose. `status_code` is what the API answers."""

    status_code = 500

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        # Fields the API adds to its {"detail": message} answer (e.g. an update's id).
        self.extra = extra


class ConfigError(RefitError):
    """Settings that cannot work (unknown key, unsafe default outside dev mode, missing binary)."""


class RedisUnavailable(RefitError):
    """Redis did not answer."""

    status_code = 503


class UpdateOutcomeUnknown(RedisUnavailable):
    """Redis stopped answering while an update was being recorded: whether it was is known only
    once Redis answers again. The answer carries the update's id, to look it up then."""


class BadRequest(RefitError):
    """The request itself is malformed."""

    status_code = 400


class UnsupportedMediaType(RefitError):
    """A body whose Content-Type is not the one the endpoint reads."""

    status_code = 415


class InvalidUpdate(RefitError):
    """The update's content is wrong: not safetensors, missing/extra tensors, shapes, NaN/Inf."""

    status_code = 422


class SourceNotAllowed(RefitError):
    """A path source outside every configured allowed root, or a pickle file."""

    status_code = 400


class PayloadTooLarge(RefitError):
    """An upload over the configured maximum size or tensor count."""

    status_code = 413


class TooBusy(RefitError):
    """The daemon holds as many in-memory updates as it may (each a copy of the whole model):
    nothing was recorded; send it again after `retry_after_s` seconds."""

    status_code = 429

    def __init__(self, message: str, *, retry_after_s: int, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.retry_after_s = retry_after_s


class InsufficientStorage(RefitError):
    """The filesystem of the data directory is full (ENOSPC, EDQUOT): nothing was kept."""

    status_code = 507


class StorageUnavailable(RefitError):
    """The data directory cannot be written (an I/O error, a read-only filesystem, permissions):
    nothing was kept."""

    status_code = 503


class NotFound(RefitError):
    """An unknown update id or version."""

    status_code = 404


class Conflict(RefitError):
    """The request conflicts with the current state (busy, bad transition)."""

    status_code = 409


class IdempotencyMismatch(RefitError):
    """The same Idempotency-Key was sent with another body."""

    status_code = 422


class StaleTransition(Conflict):
    """A compare-and-set on a state found another state than the one expected."""


class FencedOut(Conflict):
    """A write carried an epoch (fencing token) older than the current one."""


class LockHeld(Conflict):
    """Another holder owns the lock."""


class AlreadyRunning(RefitError):
    """Another refitd daemon already serves this Redis and key prefix."""


class RolloutAborted(RefitError):
    """A rank failed to prepare or missed its deadline; every rank stays on the active version."""

    status_code = 409
