"""One daemon per Redis key prefix: the claim a starting `refitd serve` takes, or is refused.

A starting daemon takes the update lock by force (its recovery must not wait for a dead holder),
so two daemons on one Redis would steal it from each other. The data directory's flock only
guards the embedded case; this claim guards every case. The `daemon` key holds the owner's id
`host:pid:token`, set with SET NX and a TTL that a keeper thread renews every third of it, so a
dead owner's claim runs out by itself. A daemon restarted on the same host after a crash need
not wait for that: a claim whose owner is on this host and whose process is gone (or is this
very process: a container restarts its daemon as pid 1 again) is taken over at once.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

import redis

from orchestrator.errors import AlreadyRunning
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import REDIS_DOWN, OutageLog

log = logging.getLogger("refitd.claim")

# Long enough that a daemon busy for seconds (a GIL-heavy step) keeps it; short enough that a
# daemon dead on another host blocks its successor for seconds, not minutes.
CLAIM_TTL_S = 15.0

# Compare-and-renew: push the TTL out only while the claim is still ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Compare-and-swap: take the claim over from a holder known to be dead, if it still holds it.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# Compare-and-delete.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class DaemonClaim:
    """`take()` at start (raises AlreadyRunning when another daemon holds it), `release()` at
    stop; a keeper thread renews it in between."""

    def __init__(self, client: redis.Redis, keys: Keys, *, ttl_s: float = CLAIM_TTL_S) -> None:
        self._r = client
        self._key = keys.daemon
        self._prefix = keys.prefix
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._renew = client.register_script(_RENEW)
        self._take_over = client.register_script(_TAKE_OVER)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def take(self) -> None:
        """Claim the prefix and start renewing it. Raises AlreadyRunning when it is taken."""
        if not self._r.set(self._key, self.owner, nx=True, px=self.ttl_ms):
            holder = self._r.get(self._key)
            if holder is None or not _dead_here(holder):
                # (None: it expired just now; a retry would race the next starter, so refuse.)
                raise AlreadyRunning(
                    f"another refitd daemon ({holder or 'just gone'}) serves this Redis with "
                    f"key prefix {self._prefix!r}; stop it, or use another redis.key_prefix "
                    f"(a dead daemon's claim expires after {self.ttl_ms / 1000:g}s)"
                )
            if not self._take_over(keys=[self._key], args=[holder, self.owner, self.ttl_ms]):
                raise AlreadyRunning(f"another refitd daemon took key prefix {self._prefix!r} "
                                     "just now")  # fmt: skip
            log.warning("took over the daemon claim of %s, which no longer runs", holder)
        self._stop.clear()
        self._keeper = threading.Thread(target=self._keep, name="daemon-claim", daemon=True)
        self._keeper.start()

    def release(self) -> None:
        """Stop renewing and delete the claim if it is still ours (so a successor need not wait)."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join()
            self._keeper = None
        try:
            self._release(keys=[self._key], args=[self.owner])
        except REDIS_DOWN as exc:
            log.warning("could not release the daemon claim (it expires by itself): %s", exc)

    def _keep(self) -> None:
        outage = OutageLog(log, "daemon claim keeper")
        while not self._stop.wait(self.ttl_ms / 3000.0):
            try:
                renewed = self._renew(keys=[self._key], args=[self.owner, self.ttl_ms])
                # Gone (this process stalled past the TTL): take it back if no one else has.
                if not renewed and not self._r.set(self._key, self.owner, nx=True, px=self.ttl_ms):
                    holder = self._r.get(self._key)
                    log.error("the daemon claim on key prefix %r is now held by %s: two daemons "
                              "may be running on it", self._prefix, holder)  # fmt: skip
                    return
            except REDIS_DOWN as exc:
                outage.failed(exc)
                continue
            outage.recovered()


def _dead_here(holder: str) -> bool:
    """True when `holder` (host:pid:token) is a daemon of this host that no longer runs."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # an earlier incarnation with our pid (pid 1 in a restarted container)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # a process of another user: alive, and not ours to judge
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
