"""Verification against bf16 reference logits: timed on a Qwen3-8B-shaped model; the calibration
table.

    PYTHONPATH=. python3 bench/verify.py --model qwen3-8b --device cuda    # TP 1 (the target)
    PYTHONPATH=. python3 bench/verify.py --model qwen3-8b --device cuda --tp 4
    PYTHONPATH=. python3 bench/verify.py --device cpu --model tiny         # CPU smoke run
    PYTHONPATH=. python3 bench/verify.py --table                 # calibration table (CPU)
    PYTHONPATH=. python3 bench/verify.py --table --write-notes   # ... into the verification notes

Run from the repository root. The timed run needs torch, triton and transformers only. It makes
random trained-looking bf16 weights on the device, quantizes them with the kernels, lays each
rank's shard out in one flat device buffer (as the pipeline hands them over), and measures, in
one process: the bf16 forward of the probe (the baseline), the first verification (it builds the
Verifier, probes torch._scaled_mm and compiles the weight-check kernel) and then `--repeat`
verifications of the same update (what each update costs), their parts, the ratio to the
baseline, and the peak GPU memory verification needed beyond what the caller already held.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from orchestrator.model import synthetic  # noqa: E402
from orchestrator.model.hf_model import build_model, forward_logits, load_weights  # noqa: E402
from orchestrator.model.planner import ModelPlan, plan_model  # noqa: E402
from orchestrator.model.probe import probe_batch  # noqa: E402
from orchestrator.model.sharding import quantize_state, shard_state  # noqa: E402
from orchestrator.model.verification import (  # noqa: E402
    Thresholds,
    VerificationReport,
    verifier_for,
    verify,
)
from tests.orchestrator import _tiny_models as tiny  # noqa: E402

NOTES = REPO / "docs" / "verification-notes.md"
TABLE_BEGIN = "<!-- verification table: begin (bench/verify.py --table --write-notes) -->"
TABLE_END = "<!-- verification table: end -->"

# Qwen3-8B's config.json, less the fields that only name files.
QWEN3_8B: dict[str, Any] = {
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "attention_bias": False,
}
MODELS = {"qwen3-8b": QWEN3_8B, **{f"tiny-{k}": v for k, v in tiny.CONFIGS.items()}}
MODELS["tiny"] = tiny.CONFIGS["qwen3"]

GiB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _pack(shard: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """One rank's shard as views into one flat device buffer, as the pipeline hands them over."""
    align = 256
    offsets, total = {}, 0
    for name, t in shard.items():
        offsets[name] = total
        total += -(-t.numel() * t.element_size() // align) * align
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    out = {}
    for name, t in shard.items():
        n = t.numel() * t.element_size()
        piece = flat[offsets[name] : offsets[name] + n]
        piece.copy_(t.contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
        out[name] = piece.view(t.dtype).view(t.shape)
    return out


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _lay_out(
    quantized: Mapping[str, torch.Tensor], plan: ModelPlan, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    if plan.tp_size == 1:
        return [_pack(quantized, device)]
    return [_pack(shard, device) for shard in shard_state(quantized, plan)]


def _bf16_forward(
    config: Mapping[str, Any],
    update: Mapping[str, torch.Tensor],
    probe: torch.Tensor,
    device: torch.device,
) -> float:
    """Median seconds of one bf16 forward of the probe through the whole model, warmed up."""
    model = build_model(config)
    load_weights(model, update, device)  # the update's own tensors: no copy
    forward_logits(model, probe)  # warm-up: cuBLAS handles, kernels loaded
    return statistics.median(
        _timed(device, lambda: forward_logits(model, probe))[0] for _ in range(5)
    )


def _profile(fn: Callable[[], Any], rows: int) -> None:
    """One call under torch.profiler (the kernels by device time, then ops by host time), and
    one under cProfile (Python functions by their own time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    import cProfile
    import pstats

    # The host side, by Python function: verification is launch-bound on a fast GPU.
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)
    print(averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def timed_run(
    model: str, device: torch.device, tp: int, seed: int, repeat: int, profile_rows: int = 0
) -> int:
    config = MODELS[model]
    times: dict[str, float] = {}

    seconds, update = _timed(
        device,
        lambda: synthetic.honest_update(
            synthetic.base_state(config, seed, device=device), seed + 1
        ),
    )
    times["init weights (not verification)"] = seconds
    plan = plan_model({n: t.shape for n, t in update.items()}, tp, config=config)
    times["quantize (kernels)"], quantized = _timed(device, lambda: quantize_state(update, plan))

    times["shards into per-rank device buffers"], shards = _timed(
        device, functools.partial(_lay_out, quantized, plan, device)
    )
    del quantized  # the shards hold their own copy, as the pipeline's buffers do

    probe = probe_batch(int(config["vocab_size"]))
    baseline = _bf16_forward(config, update, probe, device)

    thresholds = Thresholds()
    first, report = _timed(
        device, lambda: verify(config, update, shards, plan, probe, thresholds, device=device)
    )
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs: list[tuple[float, VerificationReport]] = []
    for _ in range(repeat):
        runs.append(
            _timed(
                device,
                lambda: verify(config, update, shards, plan, probe, thresholds, device=device),
            )
        )
    runs.sort(key=lambda r: r[0])
    seconds, report = runs[len(runs) // 2]
    verifier = verifier_for(config, device)

    params = sum(t.numel() for t in update.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"model {model}: {params / 1e6:,.1f}M parameters, TP {tp}, device {device} ({name}), "
          f"probe {tuple(probe.shape)}, {len(plan.fallbacks())} per-channel fallbacks")  # fmt: skip
    print(f"FP8 products: {report.gemm}")
    print(f"{'part':<58} {'seconds':>9}")
    for part, value in times.items():
        print(f"{part:<58} {value:>9.3f}")
    print(f"{'bf16 forward of the probe (baseline, median of 5)':<58} {baseline:>9.4f}")
    print(f"{'verify, first call (builds, probes scaled_mm, compiles)':<58} {first:>9.3f}")
    print(f"{'  of which: building the Verifier (once per deployment)':<58} "
          f"{verifier.build_seconds:>9.3f}")  # fmt: skip
    label = f"verify, per update (median of {repeat})"
    print(f"{label:<58} {seconds:>9.4f}")
    for part, value in report.timings.items():
        print(f"{'  ' + part:<58} {value:>9.4f}")
    ratio = seconds / baseline if baseline > 0 else float("inf")
    print(f"{'ratio: verify / bf16 forward':<58} {ratio:>8.2f}x   (target <= 3x and <= 0.15 s)")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        layer = [t for n, t in update.items() if n.startswith("model.layers.0.")]
        outer = [t for n, t in update.items() if not n.startswith("model.layers.")]
        print(
            f"peak GPU memory during verify: {(peak - held) / GiB:.2f} GiB beyond the "
            f"{held / GiB:.1f} GiB the caller held (bf16 update "
            f"{_bytes(list(update.values())) / GiB:.1f} GiB, shards "
            f"{_bytes([t for s in shards for t in s.values()]) / GiB:.1f} GiB); for scale: one "
            f"decoder layer in bf16 {_bytes(layer) / GiB:.2f} GiB, embeddings and lm_head "
            f"{_bytes(outer) / GiB:.2f} GiB"
        )
    for metric, value in report.metrics.items():
        print(f"metric {metric:<27} {value:>12.5g}")
    print(f"passed: {report.passed}" + (f" ({report.reason})" if report.reason else ""))
    if profile_rows and device.type == "cuda":
        _profile(
            lambda: verify(config, update, shards, plan, probe, thresholds, device=device),
            profile_rows,
        )
    return 0 if report.passed else 1


# The calibration table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    case: str
    family: str
    tp: int
    fallbacks: int
    report: VerificationReport


_LOGIT = ("mean_kl", "max_kl", "top1_near_agreement", "max_abs_logit_diff")
_SHORT = {"mean_kl": "mean KL", "max_kl": "max KL", "top1_near_agreement": "top-1",
          "max_abs_logit_diff": "Δlogit", "max_weight_error": "weight"}  # fmt: skip


def table_rows() -> tuple[list[Row], list[Row], list[Row]]:
    """Honest updates (every family, TP 1, 2, 4), planted faults (TP 2), hostile updates."""
    from tests.orchestrator.model import _calibration as cal

    families = cal.families(REPO / ".pytest_cache" / "d" / "refitd-verification")
    thresholds = Thresholds()

    def run(family, update, plan, shards) -> VerificationReport:
        return verify(family.config, update, shards, plan, family.probe(), thresholds)

    honest, faults, hostile = [], [], []
    for family in families:
        for tp in cal.TP_SIZES:
            plan, shards = cal.shipped(family, tp)
            report = run(family, family.update(0), plan, shards)
            honest.append(Row("honest", family.name, tp, len(plan.fallbacks()), report))
        plan, shards = cal.shipped(family, 2)
        for fault in (*tiny.SHIPPED_FAULTS, *tiny.MEASURED_FAULTS):
            try:
                planted = fault.plant(shards, plan)
            except RuntimeError:
                planted = None  # the fault cannot be laid out on this plan (see the tests)
            if planted is not None:
                report = run(family, family.update(0), plan, planted)
                faults.append(Row(fault.name, family.name, 2, len(plan.fallbacks()), report))
    for name, config in tiny.CONFIGS.items():
        family = next(f for f in families if f.name.startswith(name))
        for factor in tiny.OUTLIER_FACTORS:
            update = synthetic.outlier_update(synthetic.base_state(config, 0), factor)
            plan, shards = tiny.ship(config, update, 2)
            report = run(family, update, plan, shards)
            row = Row(f"outliers {factor:g}x peak", family.name, 2, len(plan.fallbacks()), report)
            hostile.append(row)
    return honest, faults, hostile


def _worst(usage: Mapping[str, float], names: Sequence[str]) -> str:
    name = max(names, key=lambda n: usage.get(n, 0.0))
    return f"{usage.get(name, 0.0):.2f} ({_SHORT[name]})"


def render_table(honest: list[Row], faults: list[Row], hostile: list[Row]) -> str:
    t = Thresholds()
    lines = [
        f"Thresholds: mean KL <= {t.max_mean_kl:g}, max KL <= {t.max_max_kl:g}, top-1 near "
        f"agreement >= {t.min_top1_near_agreement:g} (margin {t.top1_margin_nats:g} nats), max "
        f"|Δlogit| <= {t.max_abs_logit_diff:g}, weight error <= {t.max_weight_error:g}. A share "
        "is the part of a limit used (1 = on the limit; for the agreement, of the allowed "
        "disagreement).",
        "",
        "**Honest updates** (seed 0; one row per family and TP size):",
        "",
        "| family | TP | fallbacks | mean KL | max KL | top-1 exact | top-1 near | max regret "
        "| max abs Δlogit | weight err | largest logit share | weight share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in honest:
        m, u = row.report.metrics, row.report.usage
        lines.append(
            f"| {row.family} | {row.tp} | {row.fallbacks} | {m['mean_kl']:.4f} "
            f"| {m['max_kl']:.3f} | {m['top1_agreement']:.3f} | {m['top1_near_agreement']:.3f} "
            f"| {m['max_top1_regret']:.2f} | {m['max_abs_logit_diff']:.2f} "
            f"| {m['max_weight_error']:.4f} | {_worst(u, _LOGIT)} "
            f"| {u['max_weight_error']:.2f} |"
        )
    worst = {k: max(r.report.usage[k] for r in honest) for k in (*_LOGIT, "max_weight_error")}
    passed = sum(r.report.passed for r in honest)
    lines += [
        "",
        f"{passed} of {len(honest)} honest updates pass; the largest share of each limit used: "
        + ", ".join(f"{_SHORT[k]} {v:.2f}" for k, v in worst.items())
        + ".",
        "",
        "**Planted faults** (TP 2), per family: how many were planted and rejected, the smallest "
        "weight-check share among them, and the faults the logit metrics alone would let through "
        "(the weight check stops those):",
        "",
        "| family | planted | rejected | smallest weight share | passed by the logit metrics "
        "alone |",
        "|---|---|---|---|---|",
    ]
    for family in dict.fromkeys(r.family for r in faults):
        rows = [r for r in faults if r.family == family]
        hidden = [
            f"{r.case} ({_worst(r.report.usage, _LOGIT)})"
            for r in rows
            if all(r.report.usage[k] <= 1.0 for k in _LOGIT)
        ]
        smallest = min(r.report.usage["max_weight_error"] for r in rows)
        lines.append(
            f"| {family} | {len(rows)} | {sum(not r.report.passed for r in rows)} "
            f"| {smallest:.3g} | {'; '.join(hidden) or '-'} |"
        )
    lines += [
        "",
        "**Quantization-hostile updates** (TP 2): outliers of 10x to 1000x a tensor's peak in "
        "four blocks of every linear weight, quantized faithfully:",
        "",
        "| case | family | mean KL | max KL | top-1 near | max abs Δlogit | weight err | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in hostile:
        m, u = row.report.metrics, row.report.usage
        verdict = "pass" if row.report.passed else "rejected"
        lines.append(
            f"| {row.case} | {row.family} | {m['mean_kl']:.4f} | {m['max_kl']:.3f} "
            f"| {m['top1_near_agreement']:.3f} | {m['max_abs_logit_diff']:.2f} "
            f"| {m['max_weight_error']:.4f} | {verdict}, {_worst(u, _LOGIT)} |"
        )
    return "\n".join(lines)


def write_notes(table: str) -> None:
    text = NOTES.read_text()
    begin, end = text.index(TABLE_BEGIN), text.index(TABLE_END)
    NOTES.write_text(text[: begin + len(TABLE_BEGIN)] + "\n" + table + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen3-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tp", type=int, default=1, help="TP size the shards are made for")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5, help="timed verifications per run")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="ROWS",
        help="on CUDA: profile one more verification, print the top ROWS ops",
    )  # fmt: skip
    parser.add_argument("--table", action="store_true", help="print the calibration table")
    parser.add_argument("--write-notes", action="store_true", help="with --table: update the notes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # per-channel fallback warnings are expected here
    if args.table:
        torch.manual_seed(0)
        table = render_table(*table_rows())
        print(table)
        if args.write_notes:
            write_notes(table)
        return 0
    device = torch.device(args.device)
    if device.type == "cpu" and args.model == "qwen3-8b":
        parser.error("the 8B model is for a GPU; on the CPU use --model tiny")
    # The scaled_mm probe's verdict is a WARNING worth seeing when it falls back.
    logging.getLogger("refitd.verification").setLevel(logging.WARNING)
    with torch.inference_mode():
        return timed_run(args.model, device, args.tp, args.seed, args.repeat, args.profile)


if __name__ == "__main__":
    sys.exit(main())
