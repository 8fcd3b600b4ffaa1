"""The `distributed` route between two processes: refitd's bucketed transfer against
torch.distributed's own send/recv of one tensor of the same size, measured in the same run.

    python bench/transfer.py --device cuda             # 2 GPUs, NCCL: a Qwen3-8B TP-2 rank-1 shard
    python bench/transfer.py --device cuda --backend gloo  # 1 GPU: both sides on it, gloo
    python bench/transfer.py --device cpu --size-mb 64 # smoke test: gloo on loopback

Run from the repository root. This process plays the daemon (GPU 0, or the CPU) and starts one
more for the rank (GPU 1, or the CPU); they form one process group of two through a TCPStore on
loopback, exactly as refitd does (orchestrator/data/dist.py: `Link`), and every measurement
below goes over that group:
- baseline: `ProcessGroup.send/recv` of the whole buffer as one tensor;
- refitd: `Link.send/recv_into` (header, buckets, two in flight) for each bucket size of the
  sweep; the target is >= 80% of the baseline at the default bucket (ranks.dist_bucket_mb);
- peak extra memory per side during a transfer: the CUDA allocator's peak above what was
  allocated before it, and the staging buckets the transfer allocated (target: <= 2 buckets).
GB/s is the buffer's bytes over the receiver's time from a go message to the last byte in
place (best of --trials, after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kernels.digest import digest  # noqa: E402
from orchestrator.data.dist import (  # noqa: E402
    RECEIVER,
    SENDER,
    Link,
    connect_store,
    open_store,
)
from orchestrator.data.flat import layout, padded  # noqa: E402
from orchestrator.settings import RankSettings  # noqa: E402

TARGET_RATIO = 0.80
DEADLINE_S = 300.0
_MIB = 1 << 20

# Qwen3-8B (config.json): hidden 4096, intermediate 12288, 36 layers, 32 heads, 8 KV heads,
# head_dim 128, vocab 151936, untied embeddings.
_HIDDEN, _INTER, _LAYERS, _HEADS, _KV, _HEAD_DIM, _VOCAB = 4096, 12288, 36, 32, 8, 128, 151936


def qwen3_8b_rank_shard_bytes(tp: int = 2) -> int:
    """Bytes of one rank's FP8 shard of Qwen3-8B at TP `tp`, laid out as refitd packs it:
    column-parallel q/k/v/gate/up and row-parallel o/down in FP8 with 128x128 fp32 scales,
    vocab-parallel embeddings and lm_head in bf16, norms replicated in bf16."""
    f8, f32, bf16 = torch.float8_e4m3fn, torch.float32, torch.bfloat16
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def fp8(name: str, out: int, inp: int) -> None:
        tensors[f"{name}.weight"] = (f8, (out, inp))
        tensors[f"{name}.weight_scale_inv"] = (f32, (-(-out // 128), -(-inp // 128)))

    for i in range(_LAYERS):
        p = f"model.layers.{i}"
        fp8(f"{p}.self_attn.q_proj", _HEADS * _HEAD_DIM // tp, _HIDDEN)
        fp8(f"{p}.self_attn.k_proj", _KV * _HEAD_DIM // tp, _HIDDEN)
        fp8(f"{p}.self_attn.v_proj", _KV * _HEAD_DIM // tp, _HIDDEN)
        fp8(f"{p}.self_attn.o_proj", _HIDDEN, _HEADS * _HEAD_DIM // tp)
        fp8(f"{p}.mlp.gate_proj", _INTER // tp, _HIDDEN)
        fp8(f"{p}.mlp.up_proj", _INTER // tp, _HIDDEN)
        fp8(f"{p}.mlp.down_proj", _HIDDEN, _INTER // tp)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{norm}.weight"] = (bf16, (_HIDDEN,))
        for norm in ("q_norm", "k_norm"):
            tensors[f"{p}.self_attn.{norm}.weight"] = (bf16, (_HEAD_DIM,))
    tensors["model.embed_tokens.weight"] = (bf16, (_VOCAB // tp, _HIDDEN))
    tensors["lm_head.weight"] = (bf16, (_VOCAB // tp, _HIDDEN))
    tensors["model.norm.weight"] = (bf16, (_HIDDEN,))
    _, nbytes = layout(tensors)
    return padded(nbytes)


class _Side:
    """One process's half of every measurement, in the same order on both sides."""

    def __init__(self, role: int, link: Link, device: torch.device, nbytes: int) -> None:
        self.role = role
        self.link = link
        self.device = device
        self.nbytes = nbytes
        self.pg = link.process_group
        self._tag = 1 << 20  # above any bucket's tag
        if role == SENDER:
            gen = torch.Generator(device=device).manual_seed(0)
            self.buffer = torch.randint(
                0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=gen
            )
        else:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        # The baseline sends what the backend moves: gloo moves host memory only (a CUDA buffer
        # over gloo is staged through the host by refitd's link), so its baseline is a pinned
        # host tensor of the same size.
        self.base = self.buffer
        if link.device != device:
            self.base = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self._go = torch.zeros(1, dtype=torch.int64, device=link.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wait(self, work: Any) -> None:
        self.link.wait(work, time.monotonic() + DEADLINE_S, "a baseline send/recv")

    def _handshake(self) -> None:
        # A go message right before the data: the receiver's clock starts when the sender starts.
        self._tag += 1
        if self.role == SENDER:
            self._wait(self.pg.send([self._go], RECEIVER, self._tag))
        else:
            self._wait(self.pg.recv([self._go], SENDER, self._tag))

    def baseline(self) -> float:
        self._sync()
        self._handshake()
        t0 = time.perf_counter()
        self._tag += 1
        if self.role == SENDER:
            self._wait(self.pg.send([self.base], RECEIVER, self._tag))
        else:
            self._wait(self.pg.recv([self.base], SENDER, self._tag))
        self._sync()
        return time.perf_counter() - t0

    def refitd(self, bucket: int, version: int) -> tuple[float, int, int]:
        """Seconds, the allocator's peak above the start, and the staging bytes."""
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        self._handshake()
        t0 = time.perf_counter()
        deadline = time.monotonic() + DEADLINE_S
        if self.role == SENDER:
            self.link.send(self.buffer, version=version, bucket_bytes=bucket, deadline=deadline)
        else:
            self.link.recv_into(self.buffer, version=version, bucket_bytes=bucket,
                                deadline=deadline)  # fmt: skip
        self._sync()
        seconds = time.perf_counter() - t0
        peak = 0
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - before
        return seconds, max(0, peak), self.link.staging_bytes

    def run(self, buckets: list[int], trials: int) -> dict[str, Any]:
        result: dict[str, Any] = {"baseline": [self.baseline() for _ in range(trials + 1)][1:]}
        version = 0
        for bucket in buckets:
            runs = []
            for _ in range(trials + 1):
                version += 1
                runs.append(self.refitd(bucket, version))
            result[str(bucket)] = runs[1:]
        return result


def _device(kind: str, role: int) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    # One process per GPU; on one GPU (gloo only: NCCL refuses two ranks on one device) both
    # sides share it.
    device = torch.device("cuda", role % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _side_main(args: argparse.Namespace, role: int, store: Any) -> dict[str, Any]:
    device = _device(args.device, role)
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    link = Link.join(store, group="bench", role=role, backend=backend, device=device,
                     bind_host="127.0.0.1", deadline=time.monotonic() + DEADLINE_S)  # fmt: skip
    side = _Side(role, link, device, args.nbytes)
    result = side.run(args.buckets, args.trials)
    # Bit for bit: the digest refitd checks on every received shard, of the last transfer.
    result["digest"] = digest(side.buffer)
    # The group is not dropped: both processes exit right after (see main and _receiver).
    return result


def _receiver(args: argparse.Namespace) -> None:
    store = connect_store(f"127.0.0.1:{args.port}", time.monotonic() + DEADLINE_S)
    result = _side_main(args, RECEIVER, store)
    store.set("bench/receiver", json.dumps(result))
    _exit(0)


def _exit(code: int) -> None:
    # Tearing down an NCCL communicator at interpreter exit can stall or warn at length; the
    # measurements are out, so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _table(args: argparse.Namespace, sent: dict[str, Any], got: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    gb = args.nbytes / 1e9
    base = gb / min(got["baseline"])
    default = max(1, int(RankSettings().dist_bucket_mb * _MIB))
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    title = (
        f"{backend} on {args.device}: {args.nbytes / 1e9:.2f} GB ({args.what}), "
        f"best of {args.trials}, torch {torch.__version__}"
    )
    speed = Table(title=title)
    for col in ("transfer", "bucket", "GB/s", "vs baseline"):
        speed.add_column(col, justify="right" if col != "transfer" else "left")
    speed.add_row("torch.distributed send/recv, one tensor", "-", f"{base:.2f}", "100.0%")
    ratios = {}
    for bucket in args.buckets:
        rate = gb / min(t for t, _, _ in got[str(bucket)])
        ratios[bucket] = rate / base
        mark = " (default)" if bucket == default else ""
        speed.add_row(f"refitd distributed route{mark}", f"{bucket / _MIB:g} MiB", f"{rate:.2f}",
                      f"{100 * rate / base:.1f}%")  # fmt: skip
    memory = Table(title="peak extra memory per side during a transfer (limit: 2 buckets)")
    for col in ("bucket", "side", "allocator peak", "staging", "<= 2 buckets"):
        memory.add_column(col, justify="right")
    sides = (("daemon (sender)", sent), ("rank (receiver)", got))
    for bucket in args.buckets:
        for name, result in sides:
            runs = result[str(bucket)]
            peak = max(p for _, p, _ in runs)
            staging = max(s for _, _, s in runs)
            ok = max(peak, staging) <= 2 * bucket
            memory.add_row(f"{bucket / _MIB:g} MiB", name, f"{peak / _MIB:.2f} MiB",
                           f"{staging / _MIB:.2f} MiB", "yes" if ok else "NO")  # fmt: skip
    console = Console()
    console.print(speed)
    console.print(memory)
    same = "yes" if sent["digest"] == got["digest"] else "NO"
    console.print(f"the receiver's digest equals the sender's after the last transfer: {same}")
    target_bucket = default if default in ratios else max(ratios)
    ratio = ratios[target_bucket]
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    console.print(
        f"target >= {TARGET_RATIO:.0%} of send/recv at {target_bucket / _MIB:g} MiB buckets: "
        f"{ratio:.1%}, {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None,
                        help="default: nccl on cuda, gloo on cpu")  # fmt: skip
    parser.add_argument("--size-mb", type=float, default=None,
                        help="MiB (default: a Qwen3-8B TP-2 rank-1 shard; 64 on cpu)")  # fmt: skip
    parser.add_argument("--buckets-mb", type=float, nargs="+", default=None,
                        help="MiB (default: 16 64 256 1024; 1 4 16 on cpu)")  # fmt: skip
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--role", choices=["receiver"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--nbytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--buckets", type=int, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "receiver":
        _receiver(args)
        return
    if args.device == "cuda" and torch.cuda.device_count() < 2 and args.backend != "gloo":
        sys.exit(
            f"--device cuda with NCCL needs 2 GPUs, this machine has {torch.cuda.device_count()} "
            "(on one GPU, --backend gloo runs both sides on it)"
        )
    if args.size_mb is not None:
        args.nbytes, args.what = padded(int(args.size_mb * _MIB)), f"{args.size_mb:g} MiB"
    elif args.device == "cuda":
        args.nbytes, args.what = qwen3_8b_rank_shard_bytes(2), "Qwen3-8B TP-2 rank-1 shard"
    else:
        args.nbytes, args.what = 64 * _MIB, "64 MiB"
    sweep = args.buckets_mb or ([16, 64, 256, 1024] if args.device == "cuda" else [1, 4, 16])
    args.buckets = [max(1, int(mb * _MIB)) for mb in sweep]

    store = open_store("127.0.0.1", DEADLINE_S)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "receiver",
           "--port", str(store.port), "--device", args.device, "--nbytes", str(args.nbytes),
           "--trials", str(args.trials), "--buckets", *map(str, args.buckets)]  # fmt: skip
    if args.backend:
        cmd += ["--backend", args.backend]
    child = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ))
    try:
        sent = _side_main(args, SENDER, store)
        got = json.loads(store.get("bench/receiver"))
        if child.wait(DEADLINE_S) != 0:
            sys.exit(f"the receiver process exited with code {child.returncode}")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    _table(args, sent, got)
    _exit(0)


if __name__ == "__main__":
    main()
