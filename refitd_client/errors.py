"""What the client raises: every error carries the daemon's reason (`detail`), its HTTP status
where there was one, and the update record when the update was recorded."""

from __future__ import annotations

from typing import Any


class RefitdError(Exception):
    """Base of the client's errors; str(error) is one line that says what happened."""

    def __init__(
        self, detail: str, *, status_code: int | None = None, update: dict[str, Any] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status_code
        self.update = update


class Unreachable(RefitdError):
    """The daemon could not be reached, or did not answer in time."""


class Refused(RefitdError):
    """The daemon refused the request (a 4xx or 5xx): bad input, a source it may not read, a
    model mismatch. Nothing was recorded unless `update` says otherwise."""


class Busy(Refused):
    """429 or 503: the daemon cannot take it now (too many in-memory updates held, Redis down);
    send it again after `retry_after_s`."""

    def __init__(self, detail: str, *, status_code: int, retry_after_s: float | None) -> None:
        super().__init__(detail, status_code=status_code)
        self.retry_after_s = retry_after_s


class UpdateFailed(RefitdError):
    """The update was recorded and ended without a commit; `update` is its final record."""

    @property
    def version(self) -> int | None:
        return None if self.update is None else self.update.get("version")


class Rejected(UpdateFailed):
    """The update's content was refused (NaN/Inf, failed verification); no rank changed."""


class Aborted(UpdateFailed):
    """The update could not be applied (a rank failed to prepare, the daemon stopped, its
    in-memory source was lost); every rank stayed on the active version."""


class StillRunning(RefitdError):
    """Following an update gave up before it was final; `update` is its last record."""
