"""Connecting to Redis: one place for timeouts, decoding, retries and the 'Redis is down' message.

Every client refitd makes comes from `connect()`, with one retry policy: a command that meets a
refused or dropped connection (Redis restarting, replaying its AOF) is retried a few times with
exponential backoff, so a short restart is a pause for the caller, not an error. Timeouts are
not retried: a Redis that is slow to answer is not made faster by asking again, and the command
may already have run. A loop that must outlive a longer outage (a rank agent, the lock keeper,
the update queue) goes through `keep_trying`, and says once that Redis is down and once that it
is back (`OutageLog`), instead of a warning per attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from orchestrator.errors import RedisUnavailable

T = TypeVar("T")

# A failed command is retried RETRIES times after 0.1, 0.2, 0.4 s (BASE doubling, up to CAP):
# about 0.7 s, a Redis restart on a small data set; longer outages are the caller's to ride out.
RETRIES = 3
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 0.5
# What "Redis does not answer" looks like from redis-py (OSError: a socket file that is gone).
REDIS_DOWN: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)


def backoff() -> ExponentialBackoff:
    """The backoff between attempts: `backoff().compute(failures)` seconds after `failures`."""
    return ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)


def connect(
    url: str, *, timeout_s: float = 5.0, wait_s: float = 0.0, retries: int = RETRIES
) -> redis.Redis:
    """A client for `url` (redis://… or unix://…; decoded str replies) that has answered PING.

    Its commands retry `retries` times on a refused or dropped connection. Waits up to `wait_s`
    seconds for the first PING; raises RedisUnavailable with the URL (password hidden).
    """
    client = redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        retry=Retry(backoff(), retries, supported_errors=(redis.ConnectionError,)),
    )
    deadline = time.monotonic() + wait_s
    failures = 0
    while True:
        try:
            client.ping()
            return client
        # AuthenticationError is a ConnectionError: it must be caught first, and not waited on.
        except redis.AuthenticationError as exc:
            client.close()
            raise RedisUnavailable(f"Redis at {redact(url)} refused the password: {exc}") from None
        except REDIS_DOWN as exc:
            failures += 1
            left = deadline - time.monotonic()
            if left <= 0:
                client.close()
                raise RedisUnavailable(f"Redis at {redact(url)} does not answer: {exc}") from None
            time.sleep(min(left, backoff().compute(failures)))


class OutageLog:
    """Says once that Redis stopped answering (WARNING) and once that it answers again (INFO).

    A loop that keeps going through an outage calls `failed(exc)` after each failed attempt and
    `recovered()` after each successful one; only the first failure of an outage and the first
    success after it are logged above DEBUG. Safe to share between threads.
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log = logger
        self._what = what
        self._mutex = threading.Lock()
        self._since: float | None = None
        self._failures = 0

    @property
    def down(self) -> bool:
        """True from the first failure of an outage until `recovered()`."""
        return self._since is not None

    def failed(self, exc: BaseException) -> None:
        with self._mutex:
            self._failures += 1
            first = self._since is None
            if first:
                self._since = time.monotonic()
        if first:
            self._log.warning("%s: Redis does not answer (%s); retrying until it does",
                              self._what, exc)  # fmt: skip
        else:
            self._log.debug("%s: Redis still does not answer (%s)", self._what, exc)

    def recovered(self) -> None:
        with self._mutex:
            since, failures = self._since, self._failures
            self._since, self._failures = None, 0
        if since is not None:
            self._log.info("%s: Redis answers again after %.1fs (%d failed attempts)",
                           self._what, time.monotonic() - since, failures)  # fmt: skip


def keep_trying(
    step: Callable[[], T], *, outage: OutageLog, stop: threading.Event | None = None
) -> T:
    """`step()`, tried again (with backoff) for as long as Redis does not answer.

    Each failure goes to `outage`, and the first success after one. With `stop`, gives up (and
    re-raises the last error) once it is set, so a stopping process does not wait for Redis.
    """
    failures = 0
    while True:
        try:
            result = step()
        except REDIS_DOWN as exc:
            outage.failed(exc)
            failures += 1
            pause = backoff().compute(failures)
            if stop is None:
                time.sleep(pause)
            elif stop.wait(pause):
                raise
            continue
        outage.recovered()
        return result


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}"
