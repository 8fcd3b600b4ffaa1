"""The update lock: one pipeline (or rollback, or recovery) at a time, with a fencing token.

The lock key holds `<fence>:<owner>` with a TTL (rollout.lock_ttl_s). Each acquisition takes a
new fence number from an INCR counter, so a later holder always has a larger fence than any
earlier one. The coordinator's Lua scripts compare the fence they are given with the one in the
lock key, so a holder whose lock expired while it stalled (a GC pause, SIGSTOP) cannot record a
decision after another holder took over: the expiry makes the lock safe to take, the fence makes
the late writer harmless.

While held, a background thread extends the TTL every third of it. If an extension finds the
lock gone or taken, the keeper logs an ERROR and stops; the holder learns it at its next fenced
write (the coordinator's scripts compare the fence and raise FencedOut) or at release (which
returns False). Nothing else is signalled: a holder that lost the lock can do no harm.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from types import TracebackType

import redis

from orchestrator.errors import LockHeld
from orchestrator.state.keys import Keys
from orchestrator.state.lua import LuaScript, ScriptRegistry
from orchestrator.state.redis_client import REDIS_DOWN, OutageLog
from orchestrator.state.versions import EVENTS_MAXLEN

log = logging.getLogger("refitd.lock")

ACQUIRE = LuaScript(
    name="lock_acquire",
    num_keys=3,
    errors={"HELD": LockHeld},
    source="""
-- Take the update lock with a fresh fencing number, unless someone holds it (or steal it).
-- KEYS[1] lock (string "<fence>:<owner>")  KEYS[2] fence counter  KEYS[3] events stream
-- ARGV[1] owner  ARGV[2] ttl (ms)  ARGV[3] "steal" to take it even when held, else ""
-- ARGV[4] stream MAXLEN (approximate)
-- Returns {"OK", fence} | {"HELD", msg}
local current = redis.call('GET', KEYS[1])
if current and ARGV[3] ~= 'steal' then
  local ttl = redis.call('PTTL', KEYS[1])
  return {'HELD', 'the update lock is held by ' .. current .. ' for another ' .. ttl .. ' ms'}
end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], fence .. ':' .. ARGV[1], 'PX', ARGV[2])
local reason = ''
if current then reason = 'taken over from ' .. current end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'kind', 'lock', 'to', 'held',
  'fence', fence, 'owner', ARGV[1], 'reason', reason)
return {'OK', tostring(fence)}
""",
)

_NOT_OURS_LUA = """
local function not_ours(lock_key, expected)
  local current = redis.call('GET', lock_key)
  if current == expected then return nil end
  return {'NOT_HELD', 'the update lock is no longer ' .. expected .. ' (now ' ..
    tostring(current or 'free') .. ')'}
end
"""

RELEASE = LuaScript(
    name="lock_release",
    num_keys=2,
    errors={"NOT_HELD": LockHeld},
    source=_NOT_OURS_LUA
    + """
-- Delete the lock only if it still holds our value (compare-and-delete).
-- KEYS[1] lock  KEYS[2] events stream
-- ARGV[1] expected value "<fence>:<owner>"  ARGV[2] stream MAXLEN (approximate)
-- Returns {"OK"} | {"NOT_HELD", msg}
local refused = not_ours(KEYS[1], ARGV[1])
if refused then return refused end
redis.call('DEL', KEYS[1])
local fence = string.match(ARGV[1], '^(%d+):')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'kind', 'lock', 'to', 'free',
  'fence', fence, 'owner', ARGV[1], 'reason', '')
return {'OK'}
""",
)

EXTEND = LuaScript(
    name="lock_extend",
    num_keys=1,
    errors={"NOT_HELD": LockHeld},
    source=_NOT_OURS_LUA
    + """
-- Push the lock's expiry out only if it still holds our value (compare-and-pexpire).
-- KEYS[1] lock
-- ARGV[1] expected value "<fence>:<owner>"  ARGV[2] ttl (ms)
-- Returns {"OK"} | {"NOT_HELD", msg}
local refused = not_ours(KEYS[1], ARGV[1])
if refused then return refused end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {'OK'}
""",
)

_POLL_S = 0.05


class UpdateLock:
    """The one-at-a-time update lock. Use as a context manager, or acquire()/release().

    `acquire(timeout_s=None)` raises LockHeld at once when busy; with a timeout it waits up to
    that many seconds. `fence` is the fencing number to pass to the coordinator.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        ttl_s: float,
        owner: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self._r = client
        self._keys = keys
        self._scripts = ScriptRegistry(client)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.owner = owner or f"{socket.gethostname()}:{secrets.token_hex(6)}"
        self.timeout_s = timeout_s
        self.fence: int | None = None
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    @property
    def value(self) -> str:
        if self.fence is None:
            raise AssertionError("the lock is not held")
        return f"{self.fence}:{self.owner}"

    def acquire(self, *, timeout_s: float | None = None, steal: bool = False) -> int:
        """Take the lock and return its fence. Raises LockHeld when busy past `timeout_s`.

        `steal=True` takes it even from a live holder; only a daemon that is starting uses it,
        since no pipeline of its own can run yet and any older holder is fenced out by it.
        """
        if self.fence is not None:
            raise AssertionError("the lock is already held by this object")
        wait = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + (wait or 0.0)
        script = self._scripts[ACQUIRE]
        outage = OutageLog(log, f"waiting for the update lock ({self.owner})")
        while True:
            try:
                (fence,) = script(
                    [self._keys.update_lock, self._keys.lock_fence, self._keys.events],
                    [self.owner, self.ttl_ms, "steal" if steal else "", EVENTS_MAXLEN],
                )
                break
            except LockHeld:
                outage.recovered()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(_POLL_S)
            except REDIS_DOWN as exc:
                # A Redis that stops answering while we wait our turn is waited out like a busy
                # lock (an acknowledged update must not fail for it). Had the lost call taken
                # the lock, it is held in our name until its TTL, then taken again.
                outage.failed(exc)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(_POLL_S)
        outage.recovered()
        self.fence = int(fence)
        self._stop.clear()
        self._keeper = threading.Thread(
            target=self._keep, name=f"lock-keeper-{self.fence}", daemon=True
        )
        self._keeper.start()
        return self.fence

    def extend(self) -> None:
        """Reset the TTL. Raises LockHeld if the lock expired or another holder has it."""
        self._scripts[EXTEND]([self._keys.update_lock], [self.value, self.ttl_ms])

    def release(self) -> bool:
        """Let the lock go. Returns False if it had already expired or been taken over."""
        if self.fence is None:
            return False
        self._stop.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join()
        self._keeper = None
        try:
            self._scripts[RELEASE]([self._keys.update_lock, self._keys.events], [
                self.value, EVENTS_MAXLEN])  # fmt: skip
            released = True
        except LockHeld as exc:
            log.warning("%s", exc.message)
            released = False
        except (redis.RedisError, OSError) as exc:
            # The TTL frees it; raising here would hide whatever the holder's own error was.
            log.warning("could not release the update lock: %s", exc)
            released = False
        self.fence = None
        return released

    def _keep(self) -> None:
        interval = self.ttl_ms / 3000.0
        outage = OutageLog(log, f"update lock keeper (fence {self.fence})")
        while not self._stop.wait(interval):
            try:
                self.extend()
            except LockHeld as exc:
                log.error("update lock lost: %s", exc.message)
                return
            except REDIS_DOWN as exc:
                # Redis may come back before the TTL runs out; the fence guards if it does not.
                outage.failed(exc)
                continue
            outage.recovered()

    def __enter__(self) -> UpdateLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


FENCE_CHECK_LUA = """
local function fence_ok(lock_key, fence)
  local holder = redis.call('GET', lock_key)
  if not holder then return false, 'the update lock is not held (fence ' .. fence .. ')' end
  local held = string.match(holder, '^(%d+):')
  if held ~= fence then
    return false, 'fence ' .. fence .. ' is stale: the update lock is held with fence ' .. held
  end
  return true, ''
end
"""
"""A Lua prelude for scripts that must run only under the current lock holder's fence."""
