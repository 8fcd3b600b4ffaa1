"""The HTTP side of the client: post an update, follow it to its end, map answers to errors."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from refitd_client.errors import (
    Aborted,
    Busy,
    Refused,
    Rejected,
    StillRunning,
    Unreachable,
)

if TYPE_CHECKING:
    import torch

DEFAULT_URL = "http://127.0.0.1:8470"
FINAL = ("succeeded", "failed")
UPLOAD_TYPE = "application/octet-stream"
# A progress callback gets each update record as followed ({"stage", "progress", ...}), and the
# client's own steps before the update exists ({"stage": "exporting" | "sending"}).
Progress = Callable[[dict[str, Any]], None]


def _printer() -> Progress:
    """progress=True: one line on stderr per stage."""
    last = [""]

    def show(record: dict[str, Any]) -> None:
        if record["stage"] != last[0]:
            last[0] = record["stage"]
            version = f"version {record['version']}: " if record.get("version") else ""
            print(f"refitd: {version}{record['stage']}", file=sys.stderr, flush=True)

    return show


def _poll_interval(elapsed_s: float) -> float:
    # An update takes about a second on the GPU: poll closely, then back off.
    return 0.005 if elapsed_s < 3 else 0.05 if elapsed_s < 30 else 0.5


class Client:
    """refitd's REST API as a trainer uses it. Thread-safe as httpx.Client is; close() it (or
    use it as a context manager)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout_s: float = 60.0,
        follow_timeout_s: float = 3600.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.follow_timeout_s = follow_timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Updates --------------------------------------------------------------------------------
    def push(
        self,
        named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        *,
        label: str | None = None,
        verify: bool | None = None,
        wait: bool = True,
        idempotency_key: str | None = None,
        bucket_mb: int = 1024,
        progress: bool | Progress = False,
    ) -> dict[str, Any]:
        """Push tensors (CUDA or CPU, on refitd's host) as a new version.

        They are packed into buckets (one extra copy in the trainer's memory, freed as soon as
        the daemon answers the POST, by which time it has copied them). With `wait` (default),
        returns the final update record once COMMITTED, and raises Rejected or Aborted
        otherwise; without, returns {update_id, version, status_url} at once. The daemon
        refuses before recording anything (Refused, Busy) tensors that do not match its model,
        or that come from another host or user."""
        from refitd_client.tensors import export_tensors

        report = _reporter(progress)
        report({"stage": "exporting"})
        with export_tensors(named_tensors, bucket_bytes=bucket_mb << 20) as export:
            body: dict[str, Any] = {"source": export.source()}
            report({"stage": "sending", "tensors": export.tensors, "bytes": export.nbytes})
            accepted = self._post(body, label=label, verify=verify, key=idempotency_key)
        return self.follow(accepted["update_id"], progress=progress) if wait else accepted

    def push_path(
        self,
        path: str | os.PathLike[str],
        *,
        label: str | None = None,
        verify: bool | None = None,
        wait: bool = True,
        upload: bool = False,
        idempotency_key: str | None = None,
        progress: bool | Progress = False,
    ) -> dict[str, Any]:
        """Push a safetensors file or directory that the daemon reads itself (it must lie under
        one of its sources.allowed_roots), or with `upload` send one file's bytes. Returns and
        raises as `push`."""
        source = Path(path)
        if upload:
            if not source.is_file():
                raise ValueError(f"an upload sends one .safetensors file; {source} is not a file")
            params = {
                **({"verify": "true" if verify else "false"} if verify is not None else {}),
                **({"label": label} if label else {}),
            }
            headers = {"Content-Type": UPLOAD_TYPE, **_key(idempotency_key)}
            with source.open("rb") as f:
                response = self._send(
                    "POST", "/weights/update", content=f, params=params, headers=headers
                )
            accepted = self._accepted(response)
        else:
            body = {"source": {"type": "path", "path": str(source.resolve())}}
            accepted = self._post(body, label=label, verify=verify, key=idempotency_key)
        return self.follow(accepted["update_id"], progress=progress) if wait else accepted

    def update(self, update_id: str) -> dict[str, Any]:
        """GET /weights/updates/{update_id}."""
        response = self._send("GET", f"/weights/updates/{update_id}")
        if response.status_code != 200:
            raise _refused(response)
        return response.json()  # type: ignore[no-any-return]

    def follow(
        self,
        update_id: str,
        *,
        timeout_s: float | None = None,
        progress: bool | Progress = False,
    ) -> dict[str, Any]:
        """Poll the update until it is final: its record if committed, else Rejected/Aborted;
        StillRunning after `timeout_s` (default follow_timeout_s)."""
        report = _reporter(progress)
        limit = self.follow_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        while True:
            record = self.update(update_id)
            report(record)
            if record["status"] in FINAL:
                break
            elapsed = time.monotonic() - start
            if elapsed > limit:
                raise StillRunning(
                    f"update {update_id} is still {record['stage']} after {limit:g}s; follow it "
                    f"with GET /weights/updates/{update_id}",
                    update=record,
                )
            time.sleep(_poll_interval(elapsed))
        if record["status"] == "succeeded":
            return record
        detail = f"version {record['version']} {record['stage']}: {record['error']}"
        error = Rejected if record["stage"] == "rejected" else Aborted
        raise error(detail, update=record)

    # HTTP -----------------------------------------------------------------------------------
    def _post(
        self, body: dict[str, Any], *, label: str | None, verify: bool | None, key: str | None
    ) -> dict[str, Any]:
        if label is not None:
            body["label"] = label
        if verify is not None:
            body["verify"] = verify
        # No read timeout: the daemon copies the tensors before it answers, and the trainer's
        # buffers must stay alive until it has.
        timeout = httpx.Timeout(self._http.timeout.connect, read=None)
        response = self._send(
            "POST", "/weights/update", json=body, headers=_key(key), timeout=timeout
        )
        return self._accepted(response)

    def _accepted(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code not in (200, 202):
            raise _refused(response)
        return response.json()  # type: ignore[no-any-return]

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise Unreachable(f"{self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach refitd at {self.url}: {exc}") from None


def _key(idempotency_key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": idempotency_key} if idempotency_key else {}


def _reporter(progress: bool | Progress) -> Progress:
    if progress is True:
        return _printer()
    if progress is False:
        return lambda record: None
    return progress


def _refused(response: httpx.Response) -> Refused:
    try:
        body = response.json()
        detail = body.get("detail") if isinstance(body, dict) else None
    except ValueError:
        body, detail = None, None
    line = f"{response.status_code} {response.reason_phrase}: {detail or response.text.strip()}"
    if response.status_code in (429, 503):
        retry = response.headers.get("retry-after")
        return Busy(
            line,
            status_code=response.status_code,
            retry_after_s=float(retry) if retry and retry.isdigit() else None,
        )
    update = body if isinstance(body, dict) and "update_id" in body else None
    return Refused(line, status_code=response.status_code, update=update)
