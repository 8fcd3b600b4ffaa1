"""The whole daemon at the size it exists for: `refitd serve`, a Qwen3-8B-shaped checkpoint in 4
files, default settings, on the GPU machine (see ../shared/gpu-kit/README.md for the packages).

One warm-up update, then `--updates` updates (alternating two checkpoints, page-cached), then a
rollback to the previous version. Prints, with the floors measured in the same run:
- per update: POST to COMMITTED, and the median of every stage (from the daemon's own
  refitd_update_stage_seconds histogram, differenced per update);
- the rollback (POST to answer);
- the longest gap between a rank's heartbeats (its alive key's TTL sampled every 2 ms);
- peak GPU memory (nvidia-smi, sampled) beyond what was in use before the daemon started;
- floors: the page-cached files read into pinned memory (as many reader threads as the daemon
  uses), pinned host-to-device of the bf16 bytes, device-to-device of the fp8 bytes; and the
  ratio of POST-to-COMMITTED to the floor (the read and the H2D overlap, so max of the two, plus
  the rank's D2D copy).

    eval "$(bash .gpu-kit/install.sh)" && PYTHONPATH=. python3 bench/e2e.py [--tp 2] [--scale 0.1]

`--scale` shrinks the model (layers and widths) for a smoke test; `--dir` holds the checkpoints.

The trainer row (`--trainer-pushes N`, default 3; 0 skips it): a separate trainer process makes
the model's bf16 state dict on cuda:0 and pushes it through refitd_client (source cuda_ipc, no
file anywhere) with wait=True, once to warm up and then N times, each once the previous
artifact is durable; it reports POST to COMMITTED, the daemon's stage times and the bytes the
daemon read through syscalls meanwhile (files and sockets: a path push reads the checkpoint).
`--trainer-only` runs just that row (no checkpoints, no floors); with `--device cpu --model tiny`
it is a CPU smoke test (shared memory instead of CUDA IPC):

    PYTHONPATH=. python3 bench/e2e.py --trainer-only                       # on the GPU machine
    PYTHONPATH=. python3 bench/e2e.py --trainer-only --device cpu --model tiny --trainer-pushes 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.verify import QWEN3_8B  # noqa: E402

FILES = 4
STAGES = ("loading", "quantizing", "verifying", "writing", "rolling_out")


def model_config(scale: float, model: str = "qwen3-8b") -> dict[str, Any]:
    if model != "qwen3-8b":
        from bench.verify import MODELS

        return dict(MODELS[model])
    if scale >= 1.0:
        return dict(QWEN3_8B)
    config = dict(QWEN3_8B)
    config["num_hidden_layers"] = max(2, round(36 * scale))
    config["vocab_size"] = 32768
    return config


# Checkpoints -------------------------------------------------------------------------------
def write_checkpoints(config: dict[str, Any], root: Path) -> list[Path]:
    """Two checkpoints, each FILES safetensors files with an index, unless already there: a base,
    and a step that changes the last file's tensors (the others are hard links, so the pair
    takes 20 GB of disk, not 33; the daemon reads every file either way)."""
    from safetensors.torch import save_file

    from orchestrator.model.synthetic import base_state, honest_update

    dirs = [root / "step-a", root / "step-b"]
    stamp = root / "config.json"
    if (
        stamp.exists()
        and json.loads(stamp.read_text()) == config
        and all((d / "model.safetensors.index.json").exists() for d in dirs)
    ):
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    state = base_state(config, seed=0, device="cuda")
    names = sorted(state)
    per_file = math.ceil(len(names) / FILES)
    parts = [names[i * per_file : (i + 1) * per_file] for i in range(FILES)]
    files = [f"model-{i + 1:05d}-of-{FILES:05d}.safetensors" for i in range(FILES)]
    weight_map = {n: f for f, part in zip(files, parts, strict=True) for n in part}
    for d in dirs:
        d.mkdir()
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    for f, part in zip(files, parts, strict=True):
        save_file({n: state[n].cpu() for n in part}, str(dirs[0] / f))
        if f != files[-1]:
            os.link(dirs[0] / f, dirs[1] / f)
    step = honest_update({n: state[n] for n in parts[-1]}, seed=1)
    save_file({n: t.cpu() for n, t in step.items()}, str(dirs[1] / files[-1]))
    del state, step
    torch.cuda.empty_cache()
    stamp.write_text(json.dumps(config))
    print(f"wrote 2 checkpoints in {time.perf_counter() - t0:.0f}s", flush=True)
    return dirs


def warm_page_cache(dirs: list[Path]) -> int:
    total = 0
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while chunk := fh.read(64 << 20):
                    total += len(chunk)
    return total


# Floors --------------------------------------------------------------------------------------
def _cuda_time(fn: Any, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def floors(d: Path, threads: int, fp8_bytes: int) -> dict[str, float]:
    """Seconds of the floors (best of 3), measured here before the daemon starts."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(d.glob("*.safetensors"))
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    view = pinned.numpy()
    chunk = 64 << 20
    jobs = []
    offset = 0
    for f, size in zip(files, sizes, strict=True):
        for start in range(0, size, chunk):
            jobs.append((f, start, min(chunk, size - start), offset + start))
        offset += size

    def read(job: tuple[Path, int, int, int]) -> None:
        f, start, n, at = job
        fd = os.open(f, os.O_RDONLY)
        try:
            got = os.preadv(fd, [memoryview(view[at : at + n])], start)
            assert got == n
        finally:
            os.close(fd)

    def read_all() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, jobs))

    out: dict[str, float] = {"bytes": float(total)}
    out["read_pinned"] = min(_wall(read_all) for _ in range(3))
    out["h2d"] = _copy_time(pinned, torch.empty(total, dtype=torch.uint8, device="cuda"))
    src = torch.randint(0, 255, (fp8_bytes,), dtype=torch.uint8, device="cuda")
    out["d2d_fp8"] = _copy_time(src, torch.empty_like(src))
    return out


def _copy_time(src: torch.Tensor, dst: torch.Tensor) -> float:
    seconds = _cuda_time(lambda: dst.copy_(src, non_blocking=True))
    torch.cuda.empty_cache()
    return seconds


def _wall(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# The daemon -----------------------------------------------------------------------------------
class GpuMemory(threading.Thread):
    """Peak of nvidia-smi's used memory, summed over the GPUs, sampled every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    @staticmethod
    def used_mib() -> int:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return sum(int(x) for x in out.split())

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.used_mib())


class HeartbeatGaps(threading.Thread):
    """The longest time between two refreshes of any rank's alive key (its PTTL jumps up)."""

    def __init__(self, url: str, keys: list[str]) -> None:
        super().__init__(daemon=True)
        import redis

        self.client = redis.Redis.from_url(url)
        self.keys = keys
        self.stop = threading.Event()
        self.longest = 0.0
        self.beats = 0

    def run(self) -> None:
        last_ttl = {k: -1 for k in self.keys}
        last_beat = {k: time.monotonic() for k in self.keys}
        while not self.stop.wait(0.002):
            pipe = self.client.pipeline(transaction=False)
            for k in self.keys:
                pipe.pttl(k)
            now = time.monotonic()
            for k, ttl in zip(self.keys, pipe.execute(), strict=True):
                if ttl > last_ttl[k]:
                    self.longest = max(self.longest, now - last_beat[k])
                    last_beat[k] = now
                    self.beats += 1
                last_ttl[k] = ttl
            for k in self.keys:
                self.longest = max(self.longest, now - last_beat[k])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def stage_sums(base: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    sums = {}
    for m in re.finditer(r'refitd_update_stage_seconds_sum\{stage="(\w+)"\} ([0-9.e+-]+)', text):
        sums[m.group(1)] = float(m.group(2))
    return sums


def redis_url(rank_pid: int) -> str:
    """The embedded Redis's URL, as refitd serve hands it to its rank agents (their env)."""
    environ = Path(f"/proc/{rank_pid}/environ").read_bytes().split(b"\0")
    for item in environ:
        if item.startswith(b"REFITD_REDIS__URL="):
            return item.split(b"=", 1)[1].decode()
    raise SystemExit(f"rank agent {rank_pid} has no REFITD_REDIS__URL")


# The trainer row ------------------------------------------------------------------------------
def daemon_rchar(pid: int) -> int:
    """Bytes process `pid` has read through read syscalls (files, page cache, sockets)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/io has no rchar")


def trainer_main(args: argparse.Namespace) -> None:
    """The trainer process: its state dict on args.device, pushed through refitd_client."""
    from orchestrator.model.synthetic import base_state
    from refitd_client import Client

    config = model_config(args.scale, args.model)
    state = base_state(config, seed=0, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    # A training step changes every tensor; one changed in place is enough for a new version.
    stepped = sorted(state)[-1]
    base = args.url
    out: dict[str, Any] = {
        "tensors": len(state),
        "bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }
    with Client(base, None) as client:
        t0 = time.perf_counter()
        warm = client.push(state, label="trainer-warmup")
        out["warmup_s"] = time.perf_counter() - t0
        wait_durable(base, warm["version"])
        totals, stages, reads = [], {s: [] for s in STAGES}, []
        for i in range(args.trainer_pushes):
            state[stepped].mul_(1.0 + 1e-3)
            before, read0 = stage_sums(base), daemon_rchar(args.daemon_pid)
            t0 = time.perf_counter()
            record = client.push(state, label=f"trainer-{i}")
            elapsed = time.perf_counter() - t0
            reads.append(daemon_rchar(args.daemon_pid) - read0)
            after = stage_sums(base)
            totals.append(elapsed)
            for s in STAGES:
                stages[s].append(after.get(s, 0.0) - before.get(s, 0.0))
            spent = " ".join(f"{s} {stages[s][-1]:.3f}" for s in STAGES if stages[s][-1])
            print(f"trainer push, version {record['version']}: {elapsed:.3f}s {spent}", flush=True)
            wait_durable(base, record["version"])
    out.update(all_s=totals, post_to_committed_s=statistics.median(totals),
               stages_s={s: statistics.median(v) for s, v in stages.items()},
               daemon_read_bytes=max(reads))  # fmt: skip
    Path(args.trainer_out).write_text(json.dumps(out))


def wait_durable(base: str, version: int) -> None:
    """Until `version`'s artifact is durable (written after the commit, off the hot path)."""
    t0 = time.perf_counter()
    while not http("GET", f"{base}/weights/versions/{version}")[1].get("artifact"):
        if time.perf_counter() - t0 > 180:
            raise SystemExit(f"version {version}'s artifact: not durable in 180s")
        time.sleep(0.05)


def run_trainer(args: argparse.Namespace, base: str, daemon_pid: int) -> dict[str, Any]:
    """The trainer row, from a separate process (the daemon maps that process's memory)."""
    out = args.dir / "trainer.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--as-trainer", "--url", base,
               "--daemon-pid", str(daemon_pid), "--trainer-out", str(out),
               "--trainer-pushes", str(args.trainer_pushes), "--scale", str(args.scale),
               "--model", args.model, "--device", args.device]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"the trainer process failed ({proc.returncode})")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def report_trainer(t: dict[str, Any], args: argparse.Namespace) -> None:
    where = "cuda_ipc" if args.device.startswith("cuda") else "shared memory"
    print()
    print(f"trainer push ({where}), {t['tensors']} tensors, {t['bytes'] / 1e9:.2f} GB bf16 "
          f"on {args.device}, TP {args.tp}, verification on")  # fmt: skip
    print(f"{'what':<52} {'seconds':>9}  note")
    rows = [
        (f"POST -> COMMITTED (median of {args.trainer_pushes})", t["post_to_committed_s"],
         "target <= 0.5"),
        *[(f"  stage {s}", v, "") for s, v in t["stages_s"].items() if v > 0],
        ("first push (warm-up)", t["warmup_s"], ""),
    ]  # fmt: skip
    for name, value, note in rows:
        print(f"{name:<52} {value:>9.3f}  {note}")
    print(f"{'bytes the daemon read during a push (max)':<52} {t['daemon_read_bytes']:>9d}  "
          "files and sockets; no checkpoint")  # fmt: skip
    print("all trainer POST -> COMMITTED:", " ".join(f"{x:.3f}" for x in t["all_s"]))
    out = os.environ.get("OUT")
    if out:
        Path(out, f"e2e-trainer-tp{args.tp}.json").write_text(json.dumps(t, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/refitd-bench"))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true", help="leave the daemon's data dir")
    parser.add_argument("--model", default="qwen3-8b", help="qwen3-8b, or tiny for a smoke test")
    parser.add_argument("--device", default="cuda:0", help="where the trainer's tensors live")
    parser.add_argument("--trainer-pushes", type=int, default=3)
    parser.add_argument("--trainer-only", action="store_true")
    parser.add_argument("--as-trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--daemon-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trainer-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_trainer:
        trainer_main(args)
        return
    # A `timeout` around the bench sends SIGTERM: stop the daemon and show its log all the same.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("SIGTERM"))

    from orchestrator.settings import Settings

    defaults = Settings(dev_mode=True)
    config = model_config(args.scale, args.model)
    ckpt_root = args.dir / "checkpoints"
    if not args.trainer_only:
        dirs = write_checkpoints(config, ckpt_root)
        warm_page_cache(dirs)
        bf16_bytes = sum(f.stat().st_size for f in dirs[0].glob("*.safetensors"))
        # fp8 bytes of the linear weights ~ half their bf16 bytes; embeddings/lm_head stay bf16.
        emb = 2 * config["vocab_size"] * config["hidden_size"] * 2
        fp8_bytes = (bf16_bytes - emb) // 2 + emb
        fl = floors(dirs[0], defaults.data_path.reader_threads, fp8_bytes)
        floor_s = max(fl["read_pinned"], fl["h2d"]) + fl["d2d_fp8"]
    args.dir.mkdir(parents=True, exist_ok=True)

    data_dir = args.dir / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    (args.dir / "config.json").write_text(json.dumps(config))
    port = free_port()
    env = {
        **os.environ,
        "REFITD_DEV_MODE": "true",
        "REFITD_DATA_DIR": str(data_dir),
        "REFITD_SERVER__PORT": str(port),
        "REFITD_MODEL__CONFIG": str(args.dir / "config.json"),
        "REFITD_SOURCES__ALLOWED_ROOTS": json.dumps([str(ckpt_root)]),
        "REFITD_RANKS__TP_SIZE": str(args.tp),
        # Not a speed setting: the bench machine's 64 GiB disk holds the two checkpoints and
        # two 9.4 GB artifacts, not the default five.
        "REFITD_ROLLOUT__RETENTION": "2",
        "PYTHONUNBUFFERED": "1",
    }
    base = f"http://127.0.0.1:{port}"
    memory = GpuMemory()
    mem_before = 0 if args.trainer_only else memory.used_mib()
    log_path = args.dir / "serve.log"
    log = open(log_path, "w")  # noqa: SIM115
    serve = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve"], cwd=REPO, env=env,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    results: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                status, active = http("GET", f"{base}/weights/active")
                if status == 200 and all(r["alive"] for r in active["ranks"]):
                    break
            except OSError:
                pass
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not come up; see {log_path}:\n"
                                 + log_path.read_text()[-3000:])  # fmt: skip
            time.sleep(0.2)
        if args.trainer_only:
            trainer = run_trainer(args, base, serve.pid)
            results = {"trainer": trainer}
            return
        memory.start()
        alive_keys = [f"refitd:rank:{r}:alive" for r in range(args.tp)]
        beats = HeartbeatGaps(redis_url(active["ranks"][0]["pid"]), alive_keys)
        beats.start()

        def push(d: Path) -> tuple[float, dict[str, float], dict[str, Any]]:
            before = stage_sums(base)
            t0 = time.perf_counter()
            status, body = http("POST", f"{base}/weights/update",
                                {"source": {"type": "path", "path": str(d)}})  # fmt: skip
            if status != 202:
                raise SystemExit(f"POST answered {status}: {body}")
            url = f"{base}/weights/updates/{body['update_id']}"
            give_up = time.monotonic() + 180
            while True:
                _, rec = http("GET", url)
                if rec["status"] in ("succeeded", "failed"):
                    break
                if time.monotonic() > give_up:
                    raise SystemExit(f"update {body['version']} still {rec['stage']} after 180s")
                time.sleep(0.002)
            elapsed = time.perf_counter() - t0
            if rec["status"] != "succeeded":
                raise SystemExit(f"update {body['version']} {rec['stage']}: {rec['error']}")
            after = stage_sums(base)
            stages = {s: after.get(s, 0.0) - before.get(s, 0.0) for s in STAGES}
            _, version = http("GET", f"{base}/weights/versions/{body['version']}")
            spent = " ".join(f"{s} {v:.3f}" for s, v in stages.items() if v)
            print(f"version {body['version']}: {elapsed:.3f}s {spent}", flush=True)
            return elapsed, stages, version

        warm, _, _ = push(dirs[0])
        totals, per_stage, artifact_s = [], {s: [] for s in STAGES}, []
        for i in range(args.updates):
            elapsed, stages, version = push(dirs[(i + 1) % 2])
            totals.append(elapsed)
            for s in STAGES:
                per_stage[s].append(stages[s])
            # The artifact is written after the commit; let it finish so the next update's
            # rollout is not timed waiting for it (a trainer's steps are minutes apart).
            t0 = time.perf_counter()
            while not http("GET", f"{base}/weights/versions/{version['version']}")[1].get(
                "artifact"
            ):
                if time.perf_counter() - t0 > 120:
                    raise SystemExit(
                        f"version {version['version']}'s artifact: not durable in 120s"
                    )
                time.sleep(0.05)
            artifact_s.append(time.perf_counter() - t0 + stages.get("rolling_out", 0.0))
        t0 = time.perf_counter()
        status, rolled = http("POST", f"{base}/weights/rollback", {})
        rollback_s = time.perf_counter() - t0
        if status != 200:
            raise SystemExit(f"rollback answered {status}: {rolled}")
        beats.stop.set()
        memory.stop.set()
        results = {
            "warmup_s": warm,
            "post_to_committed_s": statistics.median(totals),
            "all_s": totals,
            "stages_s": {s: statistics.median(v) for s, v in per_stage.items()},
            "artifact_after_commit_s": statistics.median(artifact_s),
            "rollback_s": rollback_s,
            "heartbeat_gap_s": beats.longest,
            "heartbeat_interval_s": defaults.ranks.heartbeat_interval_s,
            "peak_gpu_mib_over_idle": memory.peak - mem_before,
            "floors": fl,
            "floor_s": floor_s,
        }
        if args.trainer_pushes > 0:
            trainer = run_trainer(args, base, serve.pid)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        log.close()
        if not results:
            print("--- serve.log (tail)\n" + log_path.read_text()[-6000:], flush=True)
        out = os.environ.get("OUT")
        if out:
            shutil.copy(log_path, Path(out) / f"serve-tp{args.tp}.log")
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        if trainer:
            report_trainer(trainer, args)
    if not args.trainer_only:
        report(results, args, bf16_bytes, fp8_bytes)


def report(r: dict[str, Any], args: argparse.Namespace, bf16_bytes: int, fp8_bytes: int) -> None:
    fl = r["floors"]
    gb = bf16_bytes / 1e9
    rows = [
        (f"POST -> COMMITTED (median of {args.updates})", r["post_to_committed_s"], ""),
        *[(f"  stage {s}", v, "") for s, v in r["stages_s"].items() if v > 0],
        ("first update (warm-up)", r["warmup_s"], ""),
        ("artifact durable after the commit", r["artifact_after_commit_s"], "off the hot path"),
        ("rollback to the previous version", r["rollback_s"], "resident, no disk"),
        (f"floor: page-cached files -> pinned ({gb:.1f} GB)", fl["read_pinned"],
         f"{gb / fl['read_pinned']:.1f} GB/s"),
        (f"floor: pinned H2D ({gb:.1f} GB)", fl["h2d"], f"{gb / fl['h2d']:.1f} GB/s"),
        (f"floor: D2D of the fp8 bytes ({fp8_bytes / 1e9:.1f} GB)", fl["d2d_fp8"], ""),
        ("floor: max(read, H2D) + D2D", r["floor_s"], ""),
    ]  # fmt: skip
    print()
    print(f"refitd serve, Qwen3-8B-shaped x{args.scale:g}, TP {args.tp}, default settings, "
          f"{torch.cuda.get_device_name()}")  # fmt: skip
    print(f"{'what':<52} {'seconds':>9}  note")
    for name, value, note in rows:
        print(f"{name:<52} {value:>9.3f}  {note}")
    print(f"{'POST -> COMMITTED / floor':<52} {r['post_to_committed_s'] / r['floor_s']:>9.2f}x")
    gap = f"longest heartbeat gap (interval {r['heartbeat_interval_s']:g}s)"
    print(f"{gap:<52} "
          f"{r['heartbeat_gap_s']:>9.3f}")  # fmt: skip
    print(f"{'peak GPU memory over idle (GiB)':<52} {r['peak_gpu_mib_over_idle'] / 1024:>9.1f}")
    print("all POST -> COMMITTED:", " ".join(f"{t:.3f}" for t in r["all_s"]))
    out = os.environ.get("OUT")
    if out:
        Path(out, f"e2e-tp{args.tp}.json").write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
