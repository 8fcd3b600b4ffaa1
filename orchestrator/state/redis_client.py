"""Connecting to Redis: one place for timeouts, decoding and the 'Redis is down' message."""

from __future__ import annotations

import time

import redis

from orchestrator.errors import RedisUnavailable


def connect(url: str, *, timeout_s: float = 5.0, wait_s: float = 0.0) -> redis.Redis:
    """A client for `url` (decoded str replies) that has answered PING.

    Retries for up to `wait_s` seconds; raises RedisUnavailable with the URL (password hidden).
    """
    client = redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.ping()
            return client
        # AuthenticationError is a ConnectionError: it must be caught first, and not retried.
        except redis.AuthenticationError as exc:
            raise RedisUnavailable(f"Redis at {redact(url)} refused the password: {exc}") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise RedisUnavailable(f"Redis at {redact(url)} does not answer: {exc}") from None
        time.sleep(0.05)


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}"
