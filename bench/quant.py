"""Whole-model FP8 quantization on one GPU: Qwen3-8B-shaped linear weights, random bf16.

    python bench/quant.py            # the table: copy, torch reference, torch.compile, refitd
    python bench/quant.py --check    # bit-exactness, Triton vs reference, shape table + model
    python bench/quant.py --sweep    # time launch configs; --out DIR writes the best as JSON

Run from the repository root (PYTHONPATH=.). Everything is timed in the same run with
triton.testing.do_bench (CUDA events, median). GB/s counts the bytes a quantizer must move:
bf16 read + fp8 written + fp32 scales; the copy moves 2 + 2 bytes per element. "vs copy" is
the ratio of those bandwidths, the measure of the target (>= 90% blockwise, >= 80% per-channel).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import triton

from kernels.blockwise import BlockwiseCall, quantize_blockwise, quantize_blockwise_reference
from kernels.config import (
    BlockwiseConfig,
    PerChannelConfig,
    configs_for_tensor,
    device_slug,
)
from kernels.fp8 import BLOCK, cdiv
from kernels.grouped import quantize_blockwise_many, quantize_per_channel_many
from kernels.per_channel import (
    PerChannelCall,
    quantize_per_channel,
    quantize_per_channel_reference,
)

DEVICE = "cuda"  # a module constant so that a CPU smoke test (interpreter) can swap it
# Qwen3-8B (config.json): hidden 4096, intermediate 12288, 36 layers, 32 query heads and 8
# key/value heads of head_dim 128. Linear weights per layer, [out, in].
HIDDEN, INTERMEDIATE, LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 4096, 12288, 36, 32, 8, 128
LAYER_SHAPES = {
    "self_attn.q_proj": (Q_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, Q_HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
# Awkward shapes and real ones (Qwen2.5-7B's TP-8 MLP shards: 18944 / 8 = 2368).
CHECK_SHAPES = [(1, 128), (7, 130), (129, 257), (1823, 781), (2368, 3584), (3584, 2368)]
CHECK_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def model_shapes(layers: int = LAYERS) -> dict[str, tuple[int, int]]:
    return {
        f"model.layers.{i}.{name}.weight": shape
        for i in range(layers)
        for name, shape in LAYER_SHAPES.items()
    }


def make_model(layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights, each its own allocation, as a trainer's state dict would be."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g, device=DEVICE, dtype=torch.bfloat16)
        for name, shape in model_shapes(layers).items()
    }


def bench_ms(fn: Callable[[], object], rep_ms: int = 400) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def _mismatches(got: tuple[torch.Tensor, torch.Tensor], want) -> int:
    (q, s), (q_ref, s_ref) = got, want
    if q.shape != q_ref.shape or s.shape != s_ref.shape:
        return -1
    q_bad = (_bits(q) != _bits(q_ref.to(q.device))).sum().item()
    s_bad = (_bits(s) != _bits(s_ref.to(s.device))).sum().item()
    return int(q_bad + s_bad)


def _poison(nbytes: int) -> None:
    """Fill and free a block so that outputs land on 0x7F bytes (NaN in e4m3fn): an element a
    kernel fails to write shows up as a mismatch."""
    torch.full((nbytes,), 0x7F, dtype=torch.uint8, device=DEVICE)
    torch.cuda.synchronize()


def check(layers: int) -> bool:
    """Triton vs reference, bit for bit, on the shape table and on the whole model; and the
    reference on the GPU vs on the CPU (the CPU oracle is what CI checks against)."""
    ok = True
    g = torch.Generator().manual_seed(1)
    rows = []
    for shape in CHECK_SHAPES:
        for dtype in CHECK_DTYPES:
            w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
            w[:BLOCK, :BLOCK] = 0
            w[-1, -1] = 20.0
            wc = w.to(DEVICE)
            for name, fn, ref in (
                ("blockwise", quantize_blockwise, quantize_blockwise_reference),
                ("per_channel", quantize_per_channel, quantize_per_channel_reference),
            ):
                _poison(w.numel() * 2)
                triton_vs_ref = _mismatches(fn(wc), ref(wc))
                gpu_ref_vs_cpu_ref = _mismatches(ref(wc), ref(w))
                rows.append((name, shape, dtype, triton_vs_ref, gpu_ref_vs_cpu_ref))
                ok &= triton_vs_ref == 0 and gpu_ref_vs_cpu_ref == 0
    print("shape table (differing bytes of q + bits of scales; 0 = bit-exact):")
    print(f"{'scheme':12} {'shape':>14} {'dtype':>15} {'triton/ref':>11} {'gpu ref/cpu ref':>16}")
    for name, shape, dtype, a, b in rows:
        print(f"{name:12} {shape!s:>14} {dtype!s:>15} {a:>11} {b:>16}")

    model = make_model(layers, seed=2)
    ws = list(model.values())
    n = sum(w.numel() for w in ws)
    for name, many, ref in (
        ("blockwise", quantize_blockwise_many, quantize_blockwise_reference),
        ("per_channel", quantize_per_channel_many, quantize_per_channel_reference),
    ):
        _poison(n)
        outs = many(ws)
        bad = [k for k, w, out in zip(model, ws, outs, strict=True) if _mismatches(out, ref(w))]
        ok &= not bad
        print(
            f"whole model, {name}: {len(ws)} tensors, {n / 1e9:.3f}e9 params, "
            f"{len(ws) - len(bad)} bit-exact, {len(bad)} differ {bad[:3]}"
        )
        del outs
    print("CHECK", "PASSED" if ok else "FAILED")
    return ok


def _table(rows: list[tuple[str, float, float]], copy_gbs: float) -> str:
    lines = [f"{'what':44} {'ms':>9} {'GB/s':>8} {'vs copy':>8}"]
    for what, ms, nbytes in rows:
        gbs = nbytes / ms / 1e6
        lines.append(f"{what:44} {ms:9.3f} {gbs:8.0f} {gbs / copy_gbs:8.1%}")
    return "\n".join(lines)


def bench(layers: int, with_compile: bool) -> str:
    model = make_model(layers)
    ws = list(model.values())
    n = sum(w.numel() for w in ws)
    blocks = sum(cdiv(m, BLOCK) * cdiv(k, BLOCK) for m, k in (w.shape for w in ws))
    rows_total = sum(w.shape[0] for w in ws)
    blockwise_bytes = 2 * n + n + 4 * blocks
    per_channel_bytes = 2 * n + n + 4 * rows_total
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    cfg = configs_for_tensor(ws[0])
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"{len(ws)} linear weights of a Qwen3-8B-shaped model ({layers} layers): {n:,} params")
    print(f"launch configs: {cfg.source}: {asdict(cfg.blockwise)} {asdict(cfg.per_channel)}")

    rows: list[tuple[str, float, float]] = []
    copy_ms = bench_ms(lambda: dst.copy_(src))
    rows.append(("device-to-device copy, same bytes", copy_ms, 4 * n))
    rows.append(
        (
            "torch reference, one call per tensor",
            bench_ms(lambda: [quantize_blockwise_reference(w) for w in ws], rep_ms=1500),
            blockwise_bytes,
        )
    )
    if with_compile:
        compiled = torch.compile(quantize_blockwise_reference, dynamic=False)
        t0 = time.perf_counter()
        for w in ws[: len(LAYER_SHAPES)]:
            compiled(w)
        torch.cuda.synchronize()
        print(f"torch.compile of the reference: {time.perf_counter() - t0:.1f} s to compile")
        rows.append(
            (
                "torch.compile(reference), one call per tensor",
                bench_ms(lambda: [compiled(w) for w in ws]),
                blockwise_bytes,
            )
        )
    rows.append(
        (
            "refitd blockwise, one call per tensor",
            bench_ms(lambda: [quantize_blockwise(w) for w in ws]),
            blockwise_bytes,
        )
    )
    many_ms = bench_ms(lambda: quantize_blockwise_many(ws))
    rows.append(("refitd blockwise, whole model", many_ms, blockwise_bytes))
    call = BlockwiseCall(ws)
    rows.append(("  of which kernel (tables ready)", bench_ms(call.launch), blockwise_bytes))
    del call
    rows.append(
        (
            "refitd per-channel, whole model",
            bench_ms(lambda: quantize_per_channel_many(ws)),
            per_channel_bytes,
        )
    )
    call_pc = PerChannelCall(ws)
    rows.append(("  of which kernels (tables ready)", bench_ms(call_pc.launch), per_channel_bytes))
    del call_pc
    copy_again = bench_ms(lambda: dst.copy_(src))
    rows.append(("device-to-device copy again (spread)", copy_again, 4 * n))

    # Host cost of one whole-model call with the GPU idle at the start: preparing (tables,
    # allocation), launching, making the output views (after the launch, so it overlaps the
    # kernel), and the wall time until the GPU is done. Median of 7.
    def host_once() -> tuple[float, float, float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call = BlockwiseCall(ws)
        t1 = time.perf_counter()
        call.launch()
        t2 = time.perf_counter()
        call.outputs()
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t0

    samples = list(zip(*(host_once() for _ in range(7)), strict=True))
    prepare_ms, launch_ms, views_ms, wall_ms = (sorted(col)[3] * 1e3 for col in samples)

    copy_gbs = 4 * n / copy_ms / 1e6
    table = _table(rows, copy_gbs)
    floor = blockwise_bytes / copy_gbs / 1e6
    table += (
        f"\nfloor for blockwise at the copy's bandwidth: {floor:.3f} ms"
        f"\none whole-model blockwise call from an idle GPU (median of 7): prepare "
        f"{prepare_ms:.3f} ms, launch {launch_ms:.3f} ms, output views {views_ms:.3f} ms "
        f"(overlapping the kernel), wall until done {wall_ms:.3f} ms"
    )
    return table


def sweep(layers: int, out: Path | None) -> None:
    model = make_model(layers)
    ws = list(model.values())
    n = sum(w.numel() for w in ws)
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    copy_gbs = 4 * n / bench_ms(lambda: dst.copy_(src)) / 1e6
    results = []

    def measure(kind: str, cfg, many, call_cls, nbytes: int) -> None:
        kernel_ms = bench_ms(call_cls(ws, cfg).launch)
        whole_ms = bench_ms(lambda: many(ws, config=cfg))
        share = nbytes / kernel_ms / 1e6 / copy_gbs
        results.append((kind, cfg, kernel_ms, share))
        print(
            f"{kind} {asdict(cfg)}: kernel {kernel_ms:.3f} ms ({share:.1%} of copy), "
            f"whole call {whole_ms:.3f} ms",
            flush=True,
        )

    blockwise_bytes = 3 * n + 4 * sum(
        cdiv(m, BLOCK) * cdiv(k, BLOCK) for m, k in (w.shape for w in ws)
    )
    for num_warps in (4, 8, 16):
        for blocks_per_prog in (1, 2, 4):
            cfg = BlockwiseConfig(num_warps=num_warps, blocks_per_prog=blocks_per_prog)
            measure("blockwise", cfg, quantize_blockwise_many, BlockwiseCall, blockwise_bytes)
    per_channel_bytes = 3 * n + 4 * sum(w.shape[0] for w in ws)
    for num_warps in (4, 8, 16):
        for tile_elems in (8192, 16384, 32768):
            for max_single in (16384, 4096):
                cfg_pc = PerChannelConfig(
                    num_warps=num_warps, tile_elems=tile_elems, max_single_pass_n=max_single
                )
                measure(
                    "per_channel", cfg_pc, quantize_per_channel_many, PerChannelCall,
                    per_channel_bytes,
                )  # fmt: skip
    best = {
        kind: min((r for r in results if r[0] == kind), key=lambda r: r[2])
        for kind in ("blockwise", "per_channel")
    }
    doc = {
        "device": torch.cuda.get_device_name(),
        "measured": (
            f"bench/quant.py --sweep, {len(ws)} Qwen3-8B-shaped weights, torch "
            f"{torch.__version__}, triton {triton.__version__}; "
            + "; ".join(f"{k}: kernel {r[2]:.3f} ms, {r[3]:.1%} of copy" for k, r in best.items())
        ),
        "blockwise": asdict(best["blockwise"][1]),
        "per_channel": asdict(best["per_channel"][1]),
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{device_slug(torch.cuda.get_device_name())}.json").write_text(text + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="bit-exactness instead of timing")
    parser.add_argument("--sweep", action="store_true", help="time launch configs")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--out", type=Path, help="directory for the table / the tuned JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.check:
        return 0 if check(args.layers) else 1
    if args.sweep:
        sweep(args.layers, args.out)
        return 0
    table = bench(args.layers, with_compile=not args.no_compile)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_quant.txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
