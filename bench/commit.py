"""Two-phase commit latency across real rank agents, and shard throughput over HTTP.

    python bench/commit.py                      # TP 1, 2, 4, 8; 100 updates each; HTTP 256 MiB
    python bench/commit.py --tp 8 --updates 300
    python bench/commit.py --http-mib 0         # latency only

Run from the repository root; needs redis-server on PATH. Everything runs on this host: one
embedded-style Redis (AOF, appendfsync always, as `refitd serve` runs it), `refitd rank` agent
processes under the real Supervisor (CPU device), and the real Coordinator in this process.

Latency is the coordinator's own measure, from BEGIN (the transaction record, then PREPARE to
every rank) to the last rank's COMMIT ack, with small shards (--shard-kib per rank), so it is the
orchestration's cost: Redis round trips, stream wake-ups, each rank's digest checks and swap.
Writing the artifacts happens before that clock starts, as in the update pipeline. The baseline
column is TP 1 measured in the same run; the target is p99 < 50 ms at TP 8.

Throughput: one rank's shard of --http-mib MiB fetched as a remote rank does
(a rank's Receiver: GET /artifacts/V/R with a token, streamed into place, digest checked) from the
artifacts router served by uvicorn in another process; the baseline is the same function reading
the shared path.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from orchestrator.data.flat import pack  # noqa: E402
from orchestrator.rollout.coordinator import Coordinator  # noqa: E402
from orchestrator.rollout.lock import UpdateLock  # noqa: E402
from orchestrator.rollout.receive import Receiver  # noqa: E402
from orchestrator.rollout.supervisor import Supervisor  # noqa: E402
from orchestrator.settings import REPO_ROOT, Settings, load_settings  # noqa: E402
from orchestrator.state.artifacts import ArtifactStore, layout_record  # noqa: E402
from orchestrator.state.keys import Keys  # noqa: E402
from orchestrator.state.redis_client import connect  # noqa: E402
from orchestrator.state.redis_server import EmbeddedRedis  # noqa: E402
from orchestrator.state.versions import VersionStatus, VersionStore  # noqa: E402

TRAINER = "bench-trainer-token-0123456789"
ADMIN = "bench-admin-token-0123456789ab"
TARGET_P99_MS_AT_TP8 = 50.0


def _settings(root: Path, redis_url: str, tp: int, **extra: Any) -> Settings:
    config = {
        "data_dir": str(root / "data"),
        "redis": {"url": redis_url, "key_prefix": f"bench-tp{tp}"},
        "auth": {"trainer_token": TRAINER, "admin_token": ADMIN},
        "ranks": {"tp_size": tp, "launch": "external", "device": "cpu",
                  "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0},
        "rollout": {"prepare_deadline_s": 10, "commit_deadline_s": 10, "retention": 3},
        **extra,
    }  # fmt: skip
    path = root / "refitd.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_settings(path)


def _shards(tp: int, kib: int, seed: int) -> list[dict[str, torch.Tensor]]:
    # Half the bytes as an fp8 weight, the rest as a bf16 tensor: a layer in miniature.
    gen = torch.Generator().manual_seed(seed)
    n = max(1, kib * 1024 // 2)
    return [
        {
            "layer.weight": torch.randn(n, generator=gen).to(torch.float8_e4m3fn),
            "layer.weight_scale_inv": torch.rand(1, generator=gen),
            "norm.weight": torch.randn(max(1, n // 2), generator=gen).to(torch.bfloat16),
        }
        for _ in range(tp)
    ]


def _wait_ranks(client: Any, keys: Keys, tp: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [client.hget(keys.rank(r), "state") for r in range(tp)]
        alive = [client.exists(keys.rank_alive(r)) for r in range(tp)]
        if all(s == "READY" for s in states) and all(alive):
            return
        time.sleep(0.1)
    raise SystemExit(f"rank agents did not get ready within {timeout_s}s")


def bench_tp(tp: int, redis_url: str, root: Path, updates: int, shard_kib: int) -> dict:
    """Start `tp` agents, roll out warm-up + `updates` versions, return latency stats (s)."""
    settings = _settings(root, redis_url, tp)
    keys = Keys(settings.redis.key_prefix)
    client = connect(redis_url)
    versions = VersionStore(client, keys)
    artifacts = ArtifactStore(settings.resolved_data_dir())
    coordinator = Coordinator(client, keys, settings, versions, artifacts)
    supervisor = Supervisor(settings, redis_url=redis_url, log_dir=root / "logs",
                            log_level="WARNING")  # fmt: skip
    supervisor.start()
    totals, prepares, commits = [], [], []
    try:
        _wait_ranks(client, keys, tp)
        warmup = 5
        with UpdateLock(client, keys, ttl_s=60) as lock:
            assert lock.fence is not None
            for i in range(warmup + updates):
                v = versions.create(label=f"bench-{i}")
                flats = [pack(shard, device="cpu") for shard in _shards(tp, shard_kib, v)]
                info = artifacts.write_version(v, flats, metadata={})
                versions.set_fields(v, layout=layout_record(flats), artifact=info)
                versions.transition(v, VersionStatus.QUANTIZED)
                versions.transition(v, VersionStatus.VERIFIED)
                result = coordinator.rollout(v, fence=lock.fence)
                if result["pending_ranks"]:
                    raise SystemExit(f"TP {tp}: ranks {result['pending_ranks']} did not ack")
                if i >= warmup:
                    t = result["timings"]
                    totals.append(t["total_s"])
                    prepares.append(t["prepare_s"])
                    commits.append(t["commit_s"])
    finally:
        supervisor.stop()
        client.close()
    return {"tp": tp, "total": totals, "prepare": prepares, "commit": commits}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _free_port() -> int:
    # The server is another process started with settings that name its port, so the port is
    # picked here; a benchmark may retry if something takes it first.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_http(root: Path, mib: int, repeats: int = 3) -> dict:
    """MB/s of a rank loading one `mib` MiB shard from its artifact: streamed over HTTP into
    place, and read from the path (digest checked either way)."""
    port = _free_port()
    settings = _settings(root, "redis://127.0.0.1:1/0", 1,
                         server={"port": port}, ranks={"tp_size": 1, "fetch": "http"})  # fmt: skip
    store = ArtifactStore(settings.resolved_data_dir())
    elems = mib * 2**20 // 2
    flat = pack({"w": torch.randn(elems).to(torch.bfloat16)}, device="cpu")
    info = store.write_version(1, [flat], metadata={})
    entry = info["ranks"][0]
    layout = layout_record([flat])["ranks"][0]
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(root / "refitd.yaml")],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import httpx

        with httpx.Client(timeout=60) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    http.get(f"http://127.0.0.1:{port}/openapi.json")
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            over_http, from_path = [], []
            path_settings = settings.model_copy(
                update={"ranks": settings.ranks.model_copy(update={"fetch": "path"})}
            )
            by_http = Receiver(settings, 0, "cpu")
            by_path = Receiver(path_settings, 0, "cpu")
            for _ in range(repeats):
                t0 = time.perf_counter()
                by_http.load_artifact(1, entry, layout)
                over_http.append(entry["bytes"] / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                by_path.load_artifact(1, entry, layout)
                from_path.append(entry["bytes"] / (time.perf_counter() - t0))
            by_http.close()
    finally:
        server.terminate()
        server.wait()
    return {"bytes": entry["bytes"], "http": max(over_http), "path": max(from_path)}


def _serve(config: Path) -> None:
    """The artifacts router alone, as `refitd serve` mounts it (for bench_http)."""
    import uvicorn
    from fastapi import FastAPI

    from api.errors import install_error_handlers
    from api.routers import artifacts as artifacts_router
    from orchestrator.service.daemon import Refitd

    settings = load_settings(config)
    app = FastAPI()
    app.state.core = Refitd(settings)
    install_error_handlers(app)
    app.include_router(artifacts_router.router)
    uvicorn.run(app, host="127.0.0.1", port=settings.server.port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", default="1,2,4,8", help="comma-separated TP sizes")
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--shard-kib", type=int, default=64, help="bytes per rank shard, KiB")
    parser.add_argument("--http-mib", type=int, default=256, help="0 skips the HTTP run")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve)
        return

    sizes = [int(t) for t in args.tp.split(",")]
    with tempfile.TemporaryDirectory(prefix="refitd-bench-") as tmp:
        root = Path(tmp)
        redis = EmbeddedRedis(root / "redis-data", conf=REPO_ROOT / "configs" / "redis.conf")
        url = redis.start()
        try:
            results = []
            for tp in sizes:
                (root / f"tp{tp}").mkdir()
                print(f"TP {tp}: starting {tp} rank agents, {args.updates} updates ...",
                      file=sys.stderr, flush=True)  # fmt: skip
                results.append(bench_tp(tp, url, root / f"tp{tp}", args.updates, args.shard_kib))
        finally:
            redis.stop()
        http = None
        if args.http_mib:
            (root / "http").mkdir()
            http = bench_http(root / "http", args.http_mib)

    base = statistics.median(results[0]["total"])
    print(f"\nPREPARE -> last COMMIT ack, {args.updates} updates per row, {args.shard_kib} KiB "
          f"shard per rank, CPU agents (baseline: TP {results[0]['tp']})")  # fmt: skip
    print(f"{'TP':>3} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'prepare p50':>12} "
          f"{'commit p50':>11} {'p50 vs base':>12}")  # fmt: skip
    for r in results:
        ms = [x * 1000 for x in r["total"]]
        print(f"{r['tp']:>3} {_pct(ms, 0.5):8.2f} {_pct(ms, 0.99):8.2f} {max(ms):8.2f} "
              f"{statistics.median(r['prepare']) * 1000:12.2f} "
              f"{statistics.median(r['commit']) * 1000:11.2f} "
              f"{statistics.median(r['total']) / base:11.2f}x")  # fmt: skip
    tp8 = [r for r in results if r["tp"] == 8]
    if tp8:
        p99 = _pct([x * 1000 for x in tp8[0]["total"]], 0.99)
        verdict = "meets" if p99 < TARGET_P99_MS_AT_TP8 else "MISSES"
        print(f"TP 8 p99 {p99:.2f} ms {verdict} the target of {TARGET_P99_MS_AT_TP8:.0f} ms")
    if http:
        mb = http["bytes"] / 1e6
        what = f"Shard load from the artifact, {mb:.0f} MB, digest checked"
        print(f"\n{what} (best of 3; baseline: path)")
        print(f"{'path MB/s':>10} {'HTTP MB/s':>10} {'HTTP vs path':>13}")
        print(f"{http['path'] / 1e6:10.0f} {http['http'] / 1e6:10.0f} "
              f"{http['http'] / http['path']:12.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
