"""A bounded schedule of faults against a live `refitd serve`, and one table of what survived.

    python bench/faults.py                  # 2 rounds of every fault (about 1-2 minutes)
    python bench/faults.py --rounds 1

Run from the repository root; needs redis-server on PATH. Everything is real and on this host:
`refitd serve` with its embedded Redis and two CPU rank agents (a tiny Qwen3-style model, the
one `make demo` uses), and this script as the trainer. Each round pushes an honest update, then
injects every fault of the schedule in turn, each followed by an honest push:

    redis-kill      kill -9 the embedded redis-server (serve restarts it from its AOF)
    redis-pause     SIGSTOP Redis for a few seconds under a ?wait=true push, then SIGCONT
    rank-kill       kill -9 one rank agent (serve restarts it; it loads the active version)
    fifo-source     a checkpoint directory whose model.safetensors is a FIFO
    cut-source      a checkpoint cut in half
    twice-header    an upload whose header names a tensor twice
    disconnect      a client that closes its connection mid-upload
    disk-full       the uploads directory on a 1 MiB tmpfs (root only; skipped otherwise)

Meanwhile a watcher reads GET /weights/active as fast as the daemon answers. The table reports:
faults injected, updates acknowledged (answered with an update id), how they ended, updates lost
(acknowledged but never final, or final with no version record: must be 0), mixed-version
observations (two live READY ranks holding different versions: must be 0), and whether the
daemon answered /healthz and /readyz at the end. The exit code is 1 if anything must-be-zero
was not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from orchestrator.demo import MODEL  # noqa: E402
from orchestrator.model.synthetic import base_state, honest_update  # noqa: E402

TRAINER = "bench-trainer-token-0123456789"
ADMIN = "bench-admin-token-0123456789ab"
FAULTS = ("redis-kill", "redis-pause", "rank-kill", "fifo-source", "cut-source", "twice-header",
          "disconnect", "disk-full")  # fmt: skip
# Generous bounds: on two busy cores a daemon start (torch, transformers) takes ~20 s.
START_TIMEOUT_S = 180.0
UPDATE_TIMEOUT_S = 180.0
PAUSE_S = 3.0


class Daemon:
    """One `refitd serve` in a temporary directory."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.data = home / "data"
        self.root = home / "checkpoints"
        self.root.mkdir(parents=True)
        (home / "config.json").write_text(json.dumps(MODEL))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "refitd.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFITD_")}
        env.update(
            REFITD_DATA_DIR=str(self.data),
            REFITD_SERVER__PORT=str(self.port),
            REFITD_AUTH__TRAINER_TOKEN=TRAINER,
            REFITD_AUTH__ADMIN_TOKEN=ADMIN,
            REFITD_MODEL__CONFIG=str(home / "config.json"),
            REFITD_RANKS__TP_SIZE="2",
            REFITD_RANKS__DEVICE="cpu",
            REFITD_RANKS__HEARTBEAT_INTERVAL_S="0.2",
            REFITD_RANKS__HEARTBEAT_TIMEOUT_S="5",
            REFITD_RANKS__RESTART_BACKOFF_S="0.2",
            REFITD_SOURCES__ALLOWED_ROOTS=json.dumps([str(self.root)]),
            REFITD_REDIS__MAX_RESTARTS="100",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "serve"],
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {TRAINER}"}, timeout=60
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"refitd serve exited ({self.proc.returncode}); see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                ranks = self.http.get("/weights/active").json()["ranks"]
                if all(r["alive"] and r["state"] in ("READY", "REGISTERED") for r in ranks):
                    return
            time.sleep(0.2)
        raise SystemExit(f"refitd serve did not get ready in {START_TIMEOUT_S:g}s; see {self.log}")

    def redis_pid(self) -> int:
        return int((self.data / "redis" / "redis.pid").read_text().strip())

    def stop(self) -> int | None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Watcher(threading.Thread):
    """Reads /weights/active in a loop; counts snapshots where two live READY ranks disagree."""

    def __init__(self, url: str) -> None:
        super().__init__(name="watcher", daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.observations = 0
        self.mixed: list[dict[str, Any]] = []

    def run(self) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    state = client.get(f"{self.url}/weights/active").json()
                except (httpx.HTTPError, ValueError):
                    time.sleep(0.05)  # Redis down or restarting: nothing to observe
                    continue
                if "ranks" not in state:
                    continue
                self.observations += 1
                held = {
                    r["version"] for r in state["ranks"] if r["alive"] and r["state"] == "READY"
                }
                if len(held) > 1:
                    self.mixed.append(state)


class Trainer:
    """Pushes updates and remembers every one the daemon acknowledged."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.state = base_state(MODEL, seed=0)
        self.seed = 0
        self.acknowledged: dict[str, int] = {}  # update id -> version
        self.answers: Counter[str] = Counter()

    def checkpoint(self) -> Path:
        self.seed += 1
        self.state = honest_update(self.state, seed=self.seed)
        path = self.d.root / f"step-{self.seed}"
        path.mkdir()
        save_file({k: v.contiguous() for k, v in self.state.items()}, path / "model.safetensors")
        return path

    def push(self, path: Path, *, wait: bool = True) -> httpx.Response:
        response = self.d.http.post(
            "/weights/update",
            json={"source": {"type": "path", "path": str(path)}, "label": path.name},
            params={"wait": "true"} if wait else {},
            timeout=UPDATE_TIMEOUT_S,
        )
        self.record(response)
        return response

    def upload(self, data: bytes) -> httpx.Response:
        response = self.d.http.post(
            "/weights/update", content=data, headers={"Content-Type": "application/octet-stream"}
        )
        self.record(response)
        return response

    def record(self, response: httpx.Response) -> None:
        with contextlib.suppress(ValueError):
            body = response.json()
            if isinstance(body, dict) and body.get("update_id"):
                self.acknowledged[body["update_id"]] = int(body["version"])
        self.answers[str(response.status_code)] += 1

    def honest(self) -> None:
        self.push(self.checkpoint())


def _twice(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    entries = [f"{json.dumps(first)}:{json.dumps(header[first])}"]
    entries += [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in header.items()]
    text = ("{" + ",".join(entries) + "}").encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def inject(fault: str, d: Daemon, t: Trainer) -> str:
    """Inject one fault; returns what happened, in a few words ("skipped: ..." if it could not)."""
    if fault == "redis-kill":
        os.kill(d.redis_pid(), signal.SIGKILL)
        answer = t.push(t.checkpoint())
        return f"push after the kill: {answer.status_code}"
    if fault == "redis-pause":
        pid = d.redis_pid()
        answers: list[httpx.Response] = []
        pusher = threading.Thread(target=lambda: answers.append(t.push(t.checkpoint())))
        os.kill(pid, signal.SIGSTOP)
        try:
            pusher.start()
            time.sleep(PAUSE_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        pusher.join(UPDATE_TIMEOUT_S)
        return f"push through the pause: {answers[0].status_code if answers else 'no answer'}"
    if fault == "rank-kill":
        ranks = d.http.get("/weights/active").json()["ranks"]
        pid = ranks[-1].get("pid")
        if not pid:
            return "skipped: the rank's pid is not known"
        os.kill(int(pid), signal.SIGKILL)
        answer = t.push(t.checkpoint())
        return f"push after the kill: {answer.status_code}"
    if fault == "fifo-source":
        path = d.root / f"fifo-{t.seed}-{time.monotonic_ns()}"
        path.mkdir()
        os.mkfifo(path / "model.safetensors")
        return f"answer: {t.push(path, wait=False).status_code}"
    if fault == "cut-source":
        path = t.checkpoint()
        file = path / "model.safetensors"
        os.truncate(file, file.stat().st_size // 2)
        return f"answer: {t.push(path, wait=False).status_code}"
    if fault == "twice-header":
        data = (t.checkpoint() / "model.safetensors").read_bytes()
        return f"answer: {t.upload(_twice(data)).status_code}"
    if fault == "disconnect":
        data = (t.checkpoint() / "model.safetensors").read_bytes()
        with socket.create_connection(("127.0.0.1", d.port)) as conn:
            conn.sendall(
                b"POST /weights/update HTTP/1.1\r\nHost: refitd\r\n"
                + f"Authorization: Bearer {TRAINER}\r\n".encode()
                + b"Content-Type: application/octet-stream\r\n"
                + f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data[: len(data) // 2]
            )
        return "closed half-way"
    if fault == "disk-full":
        uploads = d.data / "uploads"
        uploads.mkdir(exist_ok=True)
        if shutil.which("mount") is None or os.geteuid() != 0:
            return "skipped: needs root and mount(8)"
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(uploads)],
                                 capture_output=True, text=True)  # fmt: skip
        if mounted.returncode != 0:
            return f"skipped: {mounted.stderr.strip()}"
        try:
            data = (t.checkpoint() / "model.safetensors").read_bytes()
            return f"answer: {t.upload(data).status_code}"
        finally:
            subprocess.run(["umount", str(uploads)], check=False)
    raise ValueError(fault)


def settle(d: Daemon, t: Trainer) -> tuple[int, Counter[str]]:
    """Wait (bounded) until every acknowledged update is final; returns (lost, outcomes)."""
    deadline = time.monotonic() + UPDATE_TIMEOUT_S
    outcomes: Counter[str] = Counter()
    pending = dict(t.acknowledged)
    while pending and time.monotonic() < deadline:
        for update_id in list(pending):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                state = d.http.get(f"/weights/updates/{update_id}").json()
                if state.get("status") in ("succeeded", "failed"):
                    outcomes[state["stage"]] += 1
                    del pending[update_id]
        time.sleep(0.2)
    versions = {
        v["version"]
        for v in d.http.get("/weights/versions", params={"limit": 1000}).json()["versions"]
    }
    lost = len(pending) + sum(1 for v in t.acknowledged.values() if v not in versions)
    return lost, outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="refitd-faults-") as tmp:
        d = Daemon(Path(tmp))
        watcher = Watcher(d.url)
        injected: Counter[str] = Counter()
        notes: dict[str, str] = {}
        try:
            d.wait_ready()
            t = Trainer(d)
            t.honest()
            watcher.start()
            for _ in range(args.rounds):
                for fault in FAULTS:
                    note = inject(fault, d, t)
                    notes[fault] = note
                    if not note.startswith("skipped"):
                        injected[fault] += 1
                    t.honest()
            lost, outcomes = settle(d, t)
            watcher.stop.set()
            watcher.join()
            health = d.http.get("/healthz").status_code
            ready = d.http.get("/readyz").json()
        finally:
            watcher.stop.set()
            code = d.stop()
    print(f"\nfaults against refitd serve (TP 2, CPU ranks), {args.rounds} round(s), "
          f"{time.monotonic() - started:.0f}s\n")  # fmt: skip
    rows = [(f"fault {f}", f"{injected[f]}", notes.get(f, "")) for f in FAULTS]
    rows += [
        ("faults injected", f"{sum(injected.values())}", ""),
        ("updates acknowledged", f"{len(t.acknowledged)}",
         ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items()))),
        ("HTTP answers", f"{sum(t.answers.values())}",
         ", ".join(f"{k}: {n}" for k, n in sorted(t.answers.items()))),
        ("updates lost", f"{lost}", "must be 0"),
        ("mixed-version observations", f"{len(watcher.mixed)}",
         f"must be 0 (of {watcher.observations} snapshots)"),
        ("answering at the end", "yes" if health == 200 else "no",
         f"/healthz {health}; /readyz: {ready['reason']}"),
        ("serve exit code on SIGTERM", f"{code}", "0 is a clean stop"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>5}  {note}")
    bad = lost or watcher.mixed or health != 200 or "500" in t.answers
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
