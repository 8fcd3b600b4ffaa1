"""Local rank agents (ranks.launch: local): `refitd serve` starts one `refitd rank` per TP rank,
restarts one that dies after ranks.restart_backoff_s, and stops them all when it stops.

Each agent gets the daemon's effective settings (written to `<data_dir>/ranks/settings.yaml`,
mode 0600, since it holds the tokens) and REFITD_REDIS__URL with the embedded Redis's URL and
password (a `unix://` URL). Agents die with the daemon (PR_SET_PDEATHSIG, set by the exec shim
of `orchestrator.state.children`), even when it is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml
from pydantic import SecretStr

from orchestrator.settings import REPO_ROOT, Settings
from orchestrator.state import children

log = logging.getLogger("refitd.supervisor")

_POLL_S = 0.1
# An agent that dies sooner than this after starting is crash-looping (bad settings, Redis gone):
# each such death doubles the wait before the next start, up to _MAX_BACKOFF_S.
_STABLE_S = 10.0
_MAX_BACKOFF_S = 30.0


def settings_yaml(settings: Settings) -> str:
    """The settings as YAML that load_settings reads back to the same values (secrets in clear)."""

    def plain(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    data = plain(settings.model_dump(mode="python"))
    data["data_dir"] = str(settings.resolved_data_dir())
    return yaml.safe_dump(data, sort_keys=False)


class Supervisor:
    """Keeps one `refitd rank --rank R` process alive per TP rank on this host."""

    def __init__(
        self,
        settings: Settings,
        *,
        redis_url: str,
        log_dir: Path | None = None,
        log_level: str = "INFO",
        stop_timeout_s: float = 10.0,
        on_restart: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.log_level = log_level
        self.stop_timeout_s = stop_timeout_s
        self.config_path = settings.resolved_data_dir() / "ranks" / "settings.yaml"
        self.on_restart = on_restart
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._restart_at: dict[int, float] = {}
        self._started_at: dict[int, float] = {}
        self._backoff = dict.fromkeys(
            range(settings.ranks.tp_size), settings.ranks.restart_backoff_s
        )
        self._stop = threading.Event()
        self._spawned = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def start(self) -> None:
        """Write the agents' settings and start one agent per rank."""
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(settings_yaml(self.settings))
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        # Agents are spawned from this thread only: PR_SET_PDEATHSIG fires when the spawning
        # *thread* exits, and this one lives exactly as long as the supervisor.
        self._thread = threading.Thread(target=self._monitor, name="rank-supervisor", daemon=True)
        self._thread.start()
        self._spawned.wait()

    def stop(self) -> None:
        """SIGTERM every agent, SIGKILL those still alive after stop_timeout_s."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _command(self, rank: int) -> list[str]:
        return [
            sys.executable, "-m", "orchestrator.cli", "rank", "--rank", str(rank),
            "--config", str(self.config_path), "--log-level", self.log_level,
        ]  # fmt: skip

    def _spawn(self, rank: int) -> bool:
        """Start the rank's agent; False (and a retry after the backoff) when it cannot be."""
        env = dict(os.environ, REFITD_REDIS__URL=self.redis_url)
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            out = open(self.log_dir / f"rank{rank}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            proc = subprocess.Popen(
                children.command(self._command(rank)),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=True,  # Ctrl-C reaches the daemon, which stops agents in order
            )
        except OSError as exc:
            log.error("could not start the rank %d agent: %s", rank, exc)
            self._restart_at[rank] = time.monotonic() + self.settings.ranks.restart_backoff_s
            return False
        finally:
            if out is not None:
                out.close()
        with self._mutex:
            self._procs[rank] = proc
        self._started_at[rank] = time.monotonic()
        log.info("rank %d agent started (pid %d)", rank, proc.pid)
        return True

    def _monitor(self) -> None:
        try:
            for rank in range(self.settings.ranks.tp_size):
                self._spawn(rank)
        finally:
            self._spawned.set()
        while not self._stop.wait(_POLL_S):
            now = time.monotonic()
            for rank in range(self.settings.ranks.tp_size):
                proc = self._procs.get(rank)
                if proc is not None and proc.poll() is None:
                    continue
                if rank not in self._restart_at:
                    code = proc.returncode if proc is not None else None
                    delay = self._backoff[rank]
                    log.warning("rank %d agent exited with code %s; restarting in %gs",
                                rank, code, delay)  # fmt: skip
                    self._restart_at[rank] = now + delay
                    lived = now - self._started_at.get(rank, now)
                    base = self.settings.ranks.restart_backoff_s
                    quick = min(max(2 * delay, _POLL_S), _MAX_BACKOFF_S)
                    self._backoff[rank] = quick if lived < _STABLE_S else base
                elif now >= self._restart_at[rank]:
                    del self._restart_at[rank]
                    if self._spawn(rank) and self.on_restart is not None:
                        # This thread keeps every agent alive (PR_SET_PDEATHSIG): a hook that
                        # raises must not end it.
                        try:
                            self.on_restart(rank)
                        except Exception:
                            log.exception("the on_restart hook failed for rank %d", rank)
        self._terminate_all()

    def _terminate_all(self) -> None:
        with self._mutex:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + self.stop_timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("rank agent pid %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()
        log.info("rank agents stopped")
