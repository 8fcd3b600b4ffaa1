"""Verification against bf16 reference logits: timed on a Qwen3-8B-shaped model; the fault table.

    python bench/verify.py                          # Qwen3-8B-shaped random model on CUDA, TP 1
    python bench/verify.py --tp 4                   # ... served as 4 ranks would (emulated)
    python bench/verify.py --device cpu --model tiny   # CPU smoke run of the same path
    python bench/verify.py --table                  # the calibration table (CPU, tiny models)
    python bench/verify.py --table --write-notes    # ... also written into
                                                    #     docs/verification-notes.md

Run from the repository root. Needs torch, triton and transformers only (no fastapi, redis or
pydantic-settings). The timed run prints one line per part: weight init, quantization (kernels),
sharding to CPU, and verification's own parts (model build, structure checks, unshard, weight
check, reference logits, candidate logits, comparison), then the metrics and peak GPU memory.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from orchestrator.model import synthetic  # noqa: E402
from orchestrator.model.planner import ModelPlan, plan_model  # noqa: E402
from orchestrator.model.probe import probe_batch  # noqa: E402
from orchestrator.model.sharding import quantize_state, shard_state  # noqa: E402
from orchestrator.model.verification import Thresholds, VerificationReport, verify  # noqa: E402
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(model: str, device: torch.device, tp: int, seed: int) -> int:
    config = MODELS[model]
    times: dict[str, float] = {}

    start = time.perf_counter()
    previous = synthetic.base_state(config, seed, device=device)
    update = synthetic.honest_update(previous, seed + 1)
    del previous
    _sync(device)
    times["init weights (not verification)"] = time.perf_counter() - start

    plan = plan_model({n: t.shape for n, t in update.items()}, tp, config=config)
    start = time.perf_counter()
    quantized = quantize_state(update, plan)
    _sync(device)
    times["quantize (kernels)"] = time.perf_counter() - start
    start = time.perf_counter()
    shards = shard_state(quantized, plan)
    times["shard to CPU"] = time.perf_counter() - start
    del quantized

    probe = probe_batch(int(config["vocab_size"]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report = verify(config, update, shards, plan, probe, Thresholds(), device=device)
    _sync(device)

    params = sum(t.numel() for t in update.values())
    print(f"model {model}: {params / 1e6:,.1f}M parameters, TP {tp}, device {device}, "
          f"probe {tuple(probe.shape)}, {len(plan.fallbacks())} per-channel fallbacks")  # fmt: skip
    print(f"{'part':<34} {'seconds':>9}")
    for name, seconds in times.items():
        print(f"{name:<34} {seconds:>9.3f}")
    for name, seconds in report.timings.items():
        print(f"{'verify: ' + name:<34} {seconds:>9.3f}")
    print(f"{'verify: total':<34} {report.seconds:>9.3f}")
    for name, value in report.metrics.items():
        print(f"metric {name:<27} {value:>12.5g}")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        held = sum(t.numel() * t.element_size() for t in update.values()) / 2**30
        print(f"peak GPU memory during verify: {peak:.1f} GiB (the bf16 update alone: {held:.1f})")
    print(f"passed: {report.passed}" + (f" ({report.reason})" if report.reason else ""))
    return 0


# The calibration table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    case: str
    family: str
    tp: int
    report: VerificationReport


def _run(
    config: Mapping[str, Any],
    update: Mapping[str, torch.Tensor],
    shards: list[dict[str, torch.Tensor]],
    plan: ModelPlan,
) -> VerificationReport:
    probe = probe_batch(int(config["vocab_size"]))
    return verify(config, update, shards, plan, probe, Thresholds())


def table_rows(seeds: int = 3) -> list[Row]:
    """Every case of the tests, measured: honest updates, planted faults, hostile updates."""
    rows: list[Row] = []
    for family, config in tiny.CONFIGS.items():
        for tp in (1, 2):
            for seed in range(seeds):
                update = synthetic.honest_update(synthetic.base_state(config, seed), seed + 100)
                plan, shards = tiny.ship(config, update, tp)
                report = _run(config, update, shards, plan)
                rows.append(Row(f"honest (seed {seed})", family, tp, report))
        update = synthetic.honest_update(synthetic.base_state(config, 0), 100)
        plan, shards = tiny.ship(config, update, 2)
        for fault in (*tiny.SHIPPED_FAULTS, *tiny.MEASURED_FAULTS):
            planted = fault.plant(shards, plan)
            if planted is None:
                continue
            rows.append(Row(fault.name, family, 2, _run(config, update, planted, plan)))
        for factor in tiny.OUTLIER_FACTORS:
            hostile = synthetic.outlier_update(synthetic.base_state(config, 0), factor)
            plan_h, shards_h = tiny.ship(config, hostile, 2)
            case = f"hostile: outliers {factor:g}x peak"
            rows.append(Row(case, family, 2, _run(config, hostile, shards_h, plan_h)))
    return rows


_LOGIT_METRICS = ("mean_kl", "max_kl", "top1_agreement", "max_abs_logit_diff")


def _verdict(usage: Mapping[str, float], names: tuple[str, ...]) -> str:
    worst = max(names, key=lambda n: usage.get(n, 0.0))
    share = usage.get(worst, 0.0)
    word = "pass" if share <= 1.0 else "FAIL"
    short = {"mean_kl": "mean KL", "max_kl": "max KL", "top1_agreement": "top-1",
             "max_abs_logit_diff": "Δlogit", "max_weight_error": "weight"}  # fmt: skip
    return f"{word} {share:.2g}× ({short[worst]})"


def render_table(rows: list[Row]) -> str:
    t = Thresholds()
    lines = [
        f"Thresholds: mean KL <= {t.max_mean_kl:g}, max KL <= {t.max_max_kl:g}, "
        f"top-1 >= {t.min_top1:g}, max |Δlogit| <= {t.max_abs_logit_diff:g}, "
        f"weight error <= {t.max_weight_error:g}. "
        "`share` is the largest share of a limit used (1 = on the limit; top-1 counts the share "
        "of allowed disagreement), followed by the metric that used it.",
        "",
        "| case | model | TP | mean KL | max KL | top-1 | max abs Δlogit | weight err "
        "| logit gate (share) | weight check (share) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m, u = row.report.metrics, row.report.usage
        if "mean_kl" not in m:
            reason = (row.report.reason or "").replace("|", "/")
            lines.append(
                f"| {row.case} | {row.family} | {row.tp} | - | - | - | - | - "
                f"| rejected before the logits: {reason} | |"
            )
            continue
        lines.append(
            f"| {row.case} | {row.family} | {row.tp} | {m['mean_kl']:.4f} | {m['max_kl']:.3f} "
            f"| {m['top1_agreement']:.3f} | {m['max_abs_logit_diff']:.2f} "
            f"| {m['max_weight_error']:.3g} | {_verdict(u, _LOGIT_METRICS)} "
            f"| {_verdict(u, ('max_weight_error',))} |"
        )
    honest = [r for r in rows if r.case.startswith("honest") and r.report.usage]
    worst = {k: max(r.report.usage[k] for r in honest) for k in honest[0].report.usage}
    lines += [
        "",
        f"Honest updates ({len(honest)} runs), the largest share of each limit used: "
        + ", ".join(f"{k} {v:.2f}" for k, v in worst.items())
        + ".",
    ]
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
    parser.add_argument("--table", action="store_true", help="print the calibration table")
    parser.add_argument("--write-notes", action="store_true", help="with --table: update the notes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # per-channel fallback warnings are expected here
    if args.table:
        torch.manual_seed(0)
        table = render_table(table_rows())
        print(table)
        if args.write_notes:
            write_notes(table)
        return 0
    device = torch.device(args.device)
    if device.type == "cpu" and args.model == "qwen3-8b":
        parser.error("the 8B model is for a GPU; on the CPU use --model tiny")
    return timed_run(args.model, device, args.tp, args.seed)


if __name__ == "__main__":
    sys.exit(main())
