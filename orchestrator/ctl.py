"""`refitctl`: the operators' CLI over refitd's REST API.

Exit codes: 0 success; 1 the daemon answered that the operation failed (rejected, aborted, not
ready); 2 bad usage or the daemon could not be reached. Errors print one line on stderr.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

from orchestrator.text import printable

DEFAULT_URL = "http://127.0.0.1:8470"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Look at refitd, push updates, and roll back.",
)


class _Ctx:
    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kw: Any) -> Any:
        try:
            response = self.client.request(method, path, **kw)
        except httpx.TimeoutException:
            fail(f"{self.url} did not answer in time", 2)
        except httpx.HTTPError as exc:
            fail(f"cannot reach refitd at {self.url}: {exc}", 2)
        if response.status_code not in ok:
            fail(_detail(response), 1 if response.status_code in (409, 422, 503) else 2)
        return response.json()


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return f"{response.status_code} {response.reason_phrase}: {detail or response.text.strip()}"


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"refitctl: error: {printable(message)}", err=True)
    raise typer.Exit(code)


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="REFITCTL_URL", help="refitd's address.")
    ] = DEFAULT_URL,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="REFITCTL_TOKEN", help="Bearer token (admin for rollback, trainer for push)."
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each HTTP answer.")] = 60.0,
) -> None:
    ctx.obj = _Ctx(url, token, timeout)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: list[str], rows: list[list[str]]) -> None:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]  # fmt: skip
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    typer.echo(line)
    typer.echo("  ".join("-" * w for w in widths))
    for row in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


@app.command()
def status(ctx: typer.Context) -> None:
    """The active version, every rank's state, and readiness."""
    c: _Ctx = ctx.obj
    active = c.request("GET", "/weights/active")
    ready = c.request("GET", "/readyz", ok=(200, 503))
    typer.echo(f"active version: {active['active_version'] or 'none'}")
    reason = printable(ready["reason"])
    typer.echo(f"ready:          {'yes' if ready['ready'] else 'no'} ({reason})")
    rows = [
        [str(r["rank"]), str(r.get("version") or "-"), str(r.get("state") or "-"),
         "yes" if r.get("alive") else "no", (r.get("digest") or "-")[:12],
         printable(r.get("transport") or "-")]
        for r in active["ranks"]
    ]  # fmt: skip
    typer.echo("")
    _table(["rank", "version", "state", "alive", "digest", "transport"], rows)
    if not ready["ready"]:
        raise typer.Exit(1)


@app.command()
def versions(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=1000)] = 20) -> None:
    """Versions, newest first."""
    c: _Ctx = ctx.obj
    data = c.request("GET", "/weights/versions", params={"limit": limit})
    rows = [
        [str(v["version"]), v["status"], v["label"] or "-", _when(v["created_at"]),
         (v["reason"] or "")[:70]]
        for v in data["versions"]
    ]  # fmt: skip
    _table(["version", "status", "label", "created", "reason"], rows)


@app.command()
def show(ctx: typer.Context, version: int) -> None:
    """One version: status, times, quantization report, verification metrics, per-rank states."""
    c: _Ctx = ctx.obj
    v = c.request("GET", f"/weights/versions/{version}")
    typer.echo(f"version {v['version']}: {v['status']}   label: {printable(v['label'] or '-')}")
    if v.get("reason"):
        typer.echo(f"reason: {printable(v['reason'])}")
    for name, ts in sorted(v["times"].items(), key=lambda kv: kv[1]):
        typer.echo(f"  {name:<12} {_when(ts)}")
    report = v.get("quantization") or []
    if report:
        counts: dict[str, int] = {}
        for t in report:
            counts[t["scheme"]] = counts.get(t["scheme"], 0) + 1
        typer.echo("quantization: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        for t in report:
            if t["scheme"] == "per_channel":
                typer.echo(printable(f"  per_channel {t['name']} {t['shape']}: {t.get('reason')}"))
    ver = v.get("verification")
    if ver:
        typer.echo(
            f"verification: {'passed' if ver['passed'] else 'FAILED'} in {ver['seconds']:.2f}s"
        )
        for key, value in ver["metrics"].items():
            typer.echo(f"  {key:<20} {value}")
        if ver.get("reason"):
            typer.echo(f"  reason: {printable(ver['reason'])}")
    if v.get("ranks"):
        typer.echo("")
        _table(["rank", "state", "digest"],
               [[str(r.get("rank")), str(r.get("state") or "-"), str(r.get("digest") or "-")[:12]]
                for r in v["ranks"]])  # fmt: skip


@app.command()
def rollback(
    ctx: typer.Context,
    to: Annotated[int | None, typer.Option("--to", min=1, help="Version to go back to.")] = None,
) -> None:
    """Switch every rank back, all or none (default: to the previously committed version)."""
    c: _Ctx = ctx.obj
    body = {"to_version": to} if to is not None else {}
    # The daemon may first wait for a running update to finish (limits.request_timeout_s).
    result = c.request("POST", "/weights/rollback", json=body, timeout=max(c.timeout, 900.0))
    typer.echo(
        f"rolled back: version {result['active_version']} is active"
        + (f" (was {result['previous_version']})" if result.get("previous_version") else "")
    )


@app.command()
def health(ctx: typer.Context) -> None:
    """Liveness and readiness; exit 1 when not ready."""
    c: _Ctx = ctx.obj
    live = c.request("GET", "/healthz", ok=(200, 503))
    if live["status"] != "ok":
        typer.echo(f"live: no ({printable(str(live.get('reason')))})\nready: no")
        raise typer.Exit(1)
    ready = c.request("GET", "/readyz", ok=(200, 503))
    reason = printable(ready["reason"])
    typer.echo(f"live: yes\nready: {'yes' if ready['ready'] else 'no'} ({reason})")
    if not ready["ready"]:
        raise typer.Exit(1)


@app.command()
def push(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="A safetensors directory or file.")],
    label: Annotated[str | None, typer.Option(help="Free-form, e.g. the train step.")] = None,
    verify: Annotated[
        bool | None,
        typer.Option("--verify/--no-verify", help="Default: the daemon's verification.enabled."),
    ] = None,
    upload: Annotated[
        bool, typer.Option(help="Send the bytes of one .safetensors file instead of its path.")
    ] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Replays give the same answer.")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow")] = True,
    follow_timeout: Annotated[
        float, typer.Option(help="Give up following after this many seconds (exit 1).")
    ] = 3600.0,
) -> None:
    """Post an update (through refitd_client) and follow it to the end with a progress bar."""
    from refitd_client import Client, RefitdError, Refused, UpdateFailed

    c: _Ctx = ctx.obj
    if upload and not source.is_file():
        fail(f"--upload sends one .safetensors file; {source} is not a file")
    client = Client(c.url, c.token, timeout_s=c.timeout, follow_timeout_s=follow_timeout)
    try:
        accepted = client.push_path(
            source, label=label, verify=verify, wait=False, upload=upload,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        typer.echo(f"update {accepted['update_id']}: version {accepted['version']}")
        if not follow:
            return
        show, display = _progress_display()
        with display:
            state = client.follow(accepted["update_id"], progress=show)
    except UpdateFailed as exc:
        fail(exc.detail, 1)
    except Refused as exc:
        fail(exc.detail, 1 if exc.status_code in (409, 422, 429, 503) else 2)
    except RefitdError as exc:  # unreachable (2), or still running when following gave up (1)
        fail(exc.detail, 2 if exc.update is None else 1)
    finally:
        client.close()
    typer.echo(f"version {state['version']} committed on every rank")


def _progress_display() -> tuple[
    Callable[[dict[str, Any]], None], contextlib.AbstractContextManager[Any]
]:
    """A rich progress bar on a terminal; elsewhere (a log, a pipe) one line per stage."""
    if not sys.stdout.isatty():
        shown = [""]

        def line(record: dict[str, Any]) -> None:
            if record["stage"] != shown[0]:
                shown[0] = record["stage"]
                typer.echo(printable(record["stage"]))

        return line, contextlib.nullcontext()
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description:<12}"), BarColumn(), TaskProgressColumn(),
        TimeElapsedColumn(),
    )  # fmt: skip
    task = bar.add_task("queued", total=1.0)

    def update(record: dict[str, Any]) -> None:
        bar.update(task, description=printable(record["stage"]), completed=record["progress"])

    return update, bar


if __name__ == "__main__":
    app()
