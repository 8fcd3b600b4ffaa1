"""A real TP cluster for tests: a private redis-server, real `refitd rank` processes kept alive by
the real Supervisor, and the coordinator, either in the test process or in a driver process
(tests/orchestrator/_driver.py) that a test may SIGKILL like a crashing daemon.

Versions are made the way the update pipeline makes them (create, write artifacts, store the
artifact record, QUANTIZED, VERIFIED) from small random shards.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import yaml

from orchestrator.data.flat import pack
from orchestrator.rollout.coordinator import Coordinator
from orchestrator.rollout.lock import UpdateLock
from orchestrator.rollout.supervisor import Supervisor
from orchestrator.settings import REPO_ROOT, Settings, load_settings
from orchestrator.state.artifacts import ArtifactStore, layout_record
from orchestrator.state.keys import Keys
from orchestrator.state.redis_client import connect
from orchestrator.state.versions import VersionStatus, VersionStore
from tests.conftest import RedisProcess, process_alive, wait_until

# Timeouts here are "fail if it never happens" bounds, not the way tests make things happen:
# a test that wants a dead rank kills it (a restarted agent is noticed at once by its new
# instance id), and one that wants a missed deadline waits for the decision. They are generous,
# because on two cores shared with other suites a healthy agent importing torch can stall for
# seconds, and a bound it crosses turns into a spurious abort.
FAST = {
    "ranks": {
        "device": "cpu",
        "heartbeat_interval_s": 0.1,
        "heartbeat_timeout_s": 5.0,
        "restart_backoff_s": 0.1,
    },
    "rollout": {
        "prepare_deadline_s": 10.0,
        "commit_deadline_s": 10.0,
        "retention": 3,
        "lock_ttl_s": 10,
    },
}


def random_shards(tp_size: int, seed: int, *, rows: int = 64, cols: int = 64) -> list[dict]:
    """One small shard per rank, shaped like a blockwise-FP8 layer: fp8 weight, fp32 scales,
    a bf16 norm."""
    gen = torch.Generator().manual_seed(seed)
    shards = []
    for _ in range(tp_size):
        w = torch.randn(rows, cols, generator=gen)
        shards.append(
            {
                "model.layers.0.mlp.up_proj.weight": w.to(torch.float8_e4m3fn),
                "model.layers.0.mlp.up_proj.weight_scale_inv": torch.rand(1, 1, generator=gen),
                "model.norm.weight": torch.randn(cols, generator=gen).to(torch.bfloat16),
            }
        )
    return shards


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Cluster:
    """Redis, rank agents under a Supervisor, and the stores a coordinator needs."""

    root: Path
    redis: RedisProcess
    tp_size: int
    overrides: dict = field(default_factory=dict)
    settings: Settings = field(init=False)
    config_path: Path = field(init=False)
    supervisor: Supervisor | None = field(init=False, default=None)
    client: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        config = _merge(
            _merge(FAST, {"ranks": {"tp_size": self.tp_size, "launch": "external"}}),
            {"dev_mode": True, "data_dir": str(self.root / "data"),
             "redis": {"url": self.redis.url}},
        )  # fmt: skip
        config = _merge(config, self.overrides)
        self.config_path = self.root / "refitd.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.settings = load_settings(self.config_path)
        self.keys = Keys(self.settings.redis.key_prefix)
        self.client = connect(self.redis.url)
        self.versions = VersionStore(self.client, self.keys)
        self.artifacts = ArtifactStore(self.settings.resolved_data_dir())
        self.coordinator = Coordinator(
            self.client, self.keys, self.settings, self.versions, self.artifacts
        )
        self.log_dir = self.root / "logs"
        # Each version's shards as the pipeline would hand them to the coordinator.
        self.flats: dict[int, list] = {}
        # Each rank whose agent the supervisor restarted, in order.
        self.restarted: list[int] = []

    # Ranks ---------------------------------------------------------------------------------
    def start_ranks(self, *, wait: bool = True) -> None:
        self.supervisor = Supervisor(
            self.settings,
            redis_url=self.redis.url,
            log_dir=self.log_dir,
            on_restart=self.restarted.append,
        )
        self.supervisor.start()
        if wait:
            self.wait_ready()

    def pid(self, rank: int) -> int:
        pid = int(self.rank_hash(rank)["pid"])
        assert process_alive(pid), f"rank {rank} is down"
        return pid

    def signal_rank(self, rank: int, sig: int) -> int:
        pid = self.pid(rank)
        os.kill(pid, sig)
        return pid

    def committed_history(self) -> list[int]:
        """Every version a COMMIT decision made active, in decision order (the ledger's list)."""
        return [int(v) for v in self.client.lrange(self.keys.active_history, 0, -1)]

    def rank_hash(self, rank: int) -> dict[str, str]:
        return self.client.hgetall(self.keys.rank(rank))

    def wait_ready(self, version: int | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
        """Until every rank's current agent process is alive, READY and holds `version`
        (default: the active one) with the digest of its layout. Returns the ledger's active().
        """

        def settled() -> dict[str, Any] | None:
            state = self.coordinator.ledger.active()
            want = state["active_version"] if version is None else version
            for r in state["ranks"]:
                if not r["alive"] or r["state"] != "READY" or r["version"] != want:
                    return None
                # A killed agent's hash looks alive until its heartbeat key expires: only a
                # process that runs counts.
                if not r["pid"] or not process_alive(int(r["pid"])):
                    return None
                if want is not None and r["digest"] != self.digest(want, r["rank"]):
                    return None
            return state

        return wait_until(settled, timeout_s=timeout_s)  # type: ignore[no-any-return]

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )

    # Versions ------------------------------------------------------------------------------
    def make_version(
        self, seed: int | None = None, *, label: str | None = None, shards: list | None = None
    ) -> int:
        """A VERIFIED version with artifacts, as the update pipeline leaves it for rollout."""
        version = self.versions.create(label=label)
        if shards is None:
            shards = random_shards(self.tp_size, seed if seed is not None else version)
        flats = [pack(shard, device="cpu") for shard in shards]
        self.flats[version] = flats
        self.versions.set_fields(version, layout=layout_record(flats))
        info = self.artifacts.write_version(version, flats, metadata={"label": label or ""})
        self.versions.set_fields(version, artifact=info)
        self.versions.transition(version, VersionStatus.QUANTIZED)
        self.versions.transition(version, VersionStatus.VERIFIED)
        return version

    def digest(self, version: int, rank: int) -> str:
        """The digest rank `rank`'s shard of `version` must have (its layout record's)."""
        layout = self.versions.get(version).layout
        assert layout is not None, f"version {version} has no layout"
        return layout["ranks"][rank]["digest"]  # type: ignore[no-any-return]

    def status(self, version: int) -> VersionStatus:
        return self.versions.get(version).status

    def lock(self) -> UpdateLock:
        return UpdateLock(self.client, self.keys, ttl_s=self.settings.rollout.lock_ttl_s,
                          timeout_s=10)  # fmt: skip

    def rollout(self, version: int, *, in_memory: bool = False) -> dict[str, Any]:
        """Roll `version` out; `in_memory`: with its shards in this process, as the pipeline
        does (else the ranks load the artifact)."""
        shards = self.flats[version] if in_memory else None
        with self.lock() as lock:
            assert lock.fence is not None
            return self.coordinator.rollout(version, fence=lock.fence, shards=shards)

    def rollback(self, to_version: int | None = None) -> dict[str, Any]:
        with self.lock() as lock:
            assert lock.fence is not None
            return self.coordinator.rollback(to_version, fence=lock.fence)

    def events(self, **match: str) -> list[dict[str, str]]:
        """Audit events whose fields equal `match`."""
        return [
            fields
            for _, fields in self.client.xrange(self.keys.events)
            if all(fields.get(k) == v for k, v in match.items())
        ]

    def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        self.client.close()


class Driver:
    """A daemon stand-in process: Refitd.start() (recovery included), then rollouts and
    rollbacks read one per line from stdin, each answered by one JSON line on stdout."""

    def __init__(self, cluster: Cluster) -> None:
        cmd = [sys.executable, "-m", "tests.orchestrator._driver", "--config",
               str(cluster.config_path)]  # fmt: skip
        self._log = open(cluster.root / "driver.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.started = self.read(timeout_s=30)
        assert self.started.get("started"), self.started

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def read(self, timeout_s: float = 30.0) -> dict[str, Any]:
        line = self._lines.get(timeout=timeout_s)
        if line is None:
            raise EOFError(f"driver exited with code {self.proc.wait()}")
        return json.loads(line)  # type: ignore[no-any-return]

    def call(self, command: str, timeout_s: float = 30.0) -> dict[str, Any]:
        self.send(command)
        return self.read(timeout_s)

    def kill(self) -> None:
        """SIGKILL: the crash of a daemon mid-transaction."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, step_s: float = 0.005) -> Any:
    """wait_until with a fine step, for catching a transaction at one precise point."""
    return wait_until(predicate, timeout_s=timeout_s, step_s=step_s)


def wait_txn(cluster: Cluster, version: int, predicate: Callable[[dict[str, str]], bool],
             timeout_s: float = 10.0) -> dict[str, str]:  # fmt: skip
    """Until the version's last transaction hash satisfies `predicate`; returns the hash."""

    def check() -> dict[str, str] | None:
        txn = cluster.client.hget(cluster.keys.version(version), "last_txn")
        if not txn:
            return None
        raw = cluster.client.hgetall(cluster.keys.txn(txn))
        return raw if raw and predicate(raw) else None

    return wait_for(check, timeout_s=timeout_s)  # type: ignore[no-any-return]


@pytest.fixture
def make_cluster(
    tmp_path: Path, start_redis: Callable[..., RedisProcess], clean_env: pytest.MonkeyPatch
) -> Iterator[Callable[..., Cluster]]:
    """Build clusters (private Redis, rank agents started and waited for unless start=False);
    every agent, driver-less, is stopped afterwards."""
    made: list[Cluster] = []

    def _make(tp_size: int = 4, *, start: bool = True, **overrides: Any) -> Cluster:
        root = tmp_path / f"cluster{len(made)}"
        root.mkdir()
        cluster = Cluster(root, start_redis(f"redis{len(made)}"), tp_size, overrides)
        made.append(cluster)
        if start:
            cluster.start_ranks()
        return cluster

    yield _make
    for cluster in made:
        cluster.close()


def decide_with_ranks_stopped(cluster: Cluster, driver: Driver, version: int) -> dict[str, str]:
    """Roll `version` out through `driver` so that its COMMIT is decided (and sent) while every
    rank is SIGSTOPped: when this returns, the decision is recorded and no rank has committed.
    The ranks stay stopped; resume them with `resume_ranks`. Returns the transaction hash.

    Rank 0 is stopped first, so the prepare phase waits for it. Once the others have prepared,
    the driver is stopped, rank 0 resumed until it has prepared too, every rank stopped, and the
    driver resumed: it decides COMMIT at once. Keep ranks.heartbeat_timeout_s and
    rollout.prepare_deadline_s well above the second or so this takes on a busy machine.
    """
    cluster.signal_rank(0, signal.SIGSTOP)
    driver.send(f"rollout {version}")
    others = range(1, cluster.tp_size)
    wait_txn(cluster, version, lambda t: all(t[f"r{r}"] == "PREPARED" for r in others))
    driver.proc.send_signal(signal.SIGSTOP)
    cluster.signal_rank(0, signal.SIGCONT)
    wait_txn(cluster, version, lambda t: t["r0"] == "PREPARED")
    for r in range(cluster.tp_size):
        cluster.signal_rank(r, signal.SIGSTOP)
    driver.proc.send_signal(signal.SIGCONT)
    return wait_txn(cluster, version, lambda t: t.get("decision") == "COMMIT")


def resume_ranks(cluster: Cluster) -> None:
    for r in range(cluster.tp_size):
        cluster.signal_rank(r, signal.SIGCONT)
