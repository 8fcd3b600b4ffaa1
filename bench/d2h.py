"""Where the time of "shards to CPU" goes: copying a quantized Qwen3-8B-shaped model to host memory.

    PYTHONPATH=. python3 bench/d2h.py        # on the GPU machine

Rows (one run; the baseline is the copy sharding did first, one synchronous copy per tensor):
per-tensor .to("cpu") into fresh pageable memory; one flat copy of all bytes into fresh pageable
memory; one flat copy into a pinned buffer allocated beforehand (and what pinning it cost);
per-tensor non_blocking copies into one pinned buffer; fresh pageable memory touched (page
faults) with no copy at all; then refitd's sharding.shard_state (pinned staging kept across calls)
on its first call and on later ones. The rows' names say "today" for the per-tensor baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kernels.grouped import quantize_blockwise_many
from orchestrator.model.planner import plan_model
from orchestrator.model.sharding import quantize_state, shard_state

HIDDEN, INTER, LAYERS, KV = 4096, 12288, 36, 1024


def _shapes() -> list[tuple[int, int]]:
    per_layer = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
                 (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]  # fmt: skip
    return per_layer * LAYERS


def _timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


CONFIG = {"model_type": "qwen3", "hidden_size": HIDDEN, "intermediate_size": INTER,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}  # fmt: skip
NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def _shard_state_rows() -> list[tuple[str, float]]:
    """refitd's own path, sharding.shard_state at TP 1: its first call pins the staging buffer,
    later calls (every update after the first) reuse it."""
    shapes = {
        f"model.layers.{layer}.{name}.weight": shape
        for layer in range(LAYERS)
        for name, shape in zip(NAMES, _shapes()[: len(NAMES)], strict=True)
    }
    plan = plan_model(shapes, 1, config=CONFIG)
    state = {n: torch.randn(s, device="cuda", dtype=torch.bfloat16) for n, s in shapes.items()}
    quantized = quantize_state(state, plan)
    del state
    return [
        (
            "sharding.shard_state, first call (pins staging)",
            _timed(lambda: shard_state(quantized, plan)),
        ),
        ("sharding.shard_state, next call", _timed(lambda: shard_state(quantized, plan))),
        ("sharding.shard_state, next call again", _timed(lambda: shard_state(quantized, plan))),
    ]


def main() -> None:
    ws = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in _shapes()]
    outs = quantize_blockwise_many(ws)
    del ws
    tensors = [t for pair in outs for t in pair]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    gb = nbytes / 1e9
    rows = []

    def per_tensor() -> None:
        [t.to("cpu") for t in tensors]

    rows.append(("per-tensor .to('cpu'), fresh pageable (today)", _timed(per_tensor)))

    flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    offsets = []
    pos = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        flat[pos : pos + n].copy_(t.contiguous().view(-1).view(torch.uint8))
        offsets.append((pos, n))
        pos += n
    rows.append(("one flat .cpu(), fresh pageable", _timed(lambda: flat.cpu())))

    t0 = time.perf_counter()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pin_s = time.perf_counter() - t0
    rows.append(("  allocating the pinned buffer (once)", pin_s))
    flat_to_pinned = _timed(lambda: pinned.copy_(flat, non_blocking=True))
    rows.append(("one flat copy into pinned", flat_to_pinned))

    def per_tensor_pinned() -> None:
        for t, (p, n) in zip(tensors, offsets, strict=True):
            pinned[p : p + n].copy_(t.contiguous().view(-1).view(torch.uint8), non_blocking=True)

    rows.append(("per-tensor non_blocking into pinned", _timed(per_tensor_pinned)))

    def fresh_touch() -> None:
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)

    rows.append(("fresh pageable memory, touched, no copy", _timed(fresh_touch)))
    rows.append(("pinned -> fresh pageable (CPU memcpy)", _timed(lambda: pinned.clone())))
    rows.extend(_shard_state_rows())

    base = rows[0][1]
    print(f"{len(tensors)} tensors, {gb:.2f} GB (fp8 + scales of 252 Qwen3-8B weights)")
    print(f"{'what':<48} {'s':>8} {'GB/s':>8} {'vs today':>9}")
    for name, s in rows:
        print(f"{name:<48} {s:8.3f} {gb / s:8.2f} {base / s:8.1f}x")


if __name__ == "__main__":
    main()
