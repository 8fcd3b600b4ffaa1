"""`refitd`: the daemon (`serve`) and a rank agent for ranks on other hosts (`rank`)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from orchestrator.errors import RefitError
from orchestrator.settings import Settings, load_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="refitd: versioned, verified, all-or-nothing FP8 weight updates for TP-served LLMs.",
)
log = logging.getLogger("refitd")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (default: configs/refitd.yaml)."),
]


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr, then exit."""
    typer.echo(f"refitd: error: {message}", err=True)
    raise typer.Exit(code)


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except RefitError as exc:
        fail(exc.message)


def _lock_data_dir(settings: Settings) -> int:
    data_dir = settings.resolved_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "refitd.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"another refitd serve already runs on data directory {data_dir}")
    return fd


@app.command()
def serve(config: ConfigOption = None, log_level: str = "INFO") -> None:
    """Run the API server (and, by default, an embedded Redis and the local rank agents)."""
    setup_logging(log_level)
    settings = _settings(config)
    lock_fd = _lock_data_dir(settings)
    # Bound before anything starts: a port in use is one line, and no Redis or rank is started.
    listener = _bind(settings.server.host, settings.server.port)
    import uvicorn

    from orchestrator.service.daemon import Refitd

    _Server = _server_class()

    core = Refitd(settings)
    servers: list[Any] = []

    def _fatal(reason: str) -> None:
        # From the Redis watchdog's thread: the server exits as on SIGTERM, and then refitd
        # exits non-zero below, for a supervisor (systemd, docker) to restart it.
        for running in servers:
            running.should_exit = True

    core.on_fatal = _fatal
    try:
        core.start()
    except RefitError as exc:
        core.stop()
        listener.close()
        fail(exc.message)
    try:
        # orchestrator/ must not import api/ (layering); the app is looked up by name instead.
        create_app = importlib.import_module("api.main").create_app
        uvicorn_config = uvicorn.Config(
            create_app(core),
            host=settings.server.host,
            port=settings.server.port,
            log_level=log_level.lower(),
            timeout_graceful_shutdown=10,
        )
        server = _Server(uvicorn_config)
        servers.append(server)
        if core.fatal is not None:
            server.should_exit = True
        server.run(sockets=[listener])
    finally:
        core.stop()
        listener.close()
        os.close(lock_fd)
    # After the stop, so that this line is the last one a supervisor's log shows.
    if core.fatal is not None:
        fail(core.fatal, code=1)
    if not server.started:
        fail(f"could not listen on {settings.server.host}:{settings.server.port}")


@app.command()
def rank(
    rank: Annotated[int, typer.Option("--rank", "-r", min=0, help="This agent's TP rank.")],
    config: ConfigOption = None,
    log_level: str = "INFO",
) -> None:
    """Run one rank agent (for ranks on other hosts; `serve` starts local ones itself)."""
    setup_logging(log_level)
    settings = _settings(config)
    if rank >= settings.ranks.tp_size:
        fail(f"--rank {rank} is not below ranks.tp_size={settings.ranks.tp_size}")
    from orchestrator.rollout.rank_agent import run_rank_agent

    try:
        run_rank_agent(settings, rank)
    except RefitError as exc:
        fail(exc.message)


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn listens on it), or one clear line and exit."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    try:
        # As uvicorn does: a restarted daemon need not wait for its old connections' TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    return sock


def _server_class() -> type:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT once it has shut down, which would kill refitd before
        it stops its rank agents and its Redis; here a signal only asks the server to exit."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            def _exit(signum: int, frame: object) -> None:
                self.should_exit = True

            previous = {sig: signal.signal(sig, _exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return _Server


def main() -> None:
    app()


if __name__ == "__main__":
    main()
