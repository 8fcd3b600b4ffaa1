"""How refitd runs Lua on Redis: a script is a constant with a header naming its KEYS and ARGV.

Convention: every script returns a table whose first element is a status code. "OK" means
success and the rest of the table is the result; any other code maps to a named exception from
`orchestrator.errors`, with the second element as its message. Scripts are registered once per
client (EVALSHA, re-loaded transparently by redis-py after a Redis restart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from orchestrator.errors import RefitError


@dataclass(frozen=True)
class LuaScript:
    """A Lua script, the number of KEYS it takes, and its error codes."""

    name: str
    source: str
    num_keys: int
    errors: dict[str, type[RefitError]] = field(default_factory=dict)

    def bind(self, client: redis.Redis) -> BoundScript:
        return BoundScript(self, client.register_script(self.source))


class BoundScript:
    """A LuaScript registered on one client; calling it maps status codes to exceptions."""

    def __init__(self, script: LuaScript, registered: Any) -> None:
        self._script = script
        self._registered = registered

    def __call__(self, keys: list[str], args: list[Any]) -> list[Any]:
        if len(keys) != self._script.num_keys:
            raise AssertionError(
                f"{self._script.name} takes {self._script.num_keys} keys, got {len(keys)}"
            )
        reply = self._registered(keys=keys, args=args)
        code = _text(reply[0])
        if code == "OK":
            return [_text(x) for x in reply[1:]]
        message = _text(reply[1]) if len(reply) > 1 else code
        exc = self._script.errors.get(code)
        if exc is None:
            raise AssertionError(f"{self._script.name} returned unknown code {code}: {message}")
        raise exc(message)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class ScriptRegistry:
    """Registers scripts once per client and hands out the bound ones by name."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._bound: dict[str, BoundScript] = {}

    def __getitem__(self, script: LuaScript) -> BoundScript:
        bound = self._bound.get(script.name)
        if bound is None:
            bound = self._bound[script.name] = script.bind(self._client)
        return bound
