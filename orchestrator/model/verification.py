"""Verify an update against BF16 reference logits before any rank sees it.

In order:
1. Structure of the update as sent, before any math: every tensor the model needs, nothing else,
   the right shapes, a floating dtype, no NaN or Inf. A failure raises InvalidUpdate naming the
   tensors: the trainer sent something wrong.
2. The very per-rank shards that will ship, put back together by the TP plan: the names, shapes
   and dtypes the plan gives, finite scales.
3. The weight check: each shipped tensor, dequantized, within FP8's rounding bound of the update.
4. Logits of the model as the ranks will serve it (FP8 weights and scales from those shards,
   activations quantized as SGLang's FP8 linear layers do) against the same update in bf16.
A failure in 2-4 gives a report with passed=False, the metrics and the reason: quantization or
sharding went wrong, and no rank may change.

The gate judges the quantization, not the training step; the optional drift check (off by
default) compares the new bf16 logits with the previous version's, for trainers that want a guard
against a blown-up step. Thresholds and their calibration: docs/verification-notes.md.

Torch and transformers only: the bench machine has neither pydantic-settings nor redis, so
thresholds are plain dataclasses built from the settings by the caller.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kernels.blockwise import dequantize_blockwise
from kernels.finite import find_non_finite
from kernels.fp8 import BLOCK, FP8_DTYPE
from kernels.per_channel import dequantize_per_channel
from orchestrator.errors import InvalidUpdate
from orchestrator.model.hf_model import (
    build_model,
    expected_shapes,
    forward_logits,
    install_fp8,
    load_weights,
)
from orchestrator.model.planner import ModelPlan, Scheme, scale_name
from orchestrator.model.probe import logit_metrics, probe_batch
from orchestrator.model.sharding import unshard
from orchestrator.text import some

logger = logging.getLogger("refitd.verification")

# The dtypes a trainer may send; each is cast to bf16 before quantization and for the reference.
UPDATE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)


Expected = Mapping[str, tuple[Sequence[int], torch.dtype | tuple[torch.dtype, ...]]]


@dataclass(frozen=True)
class Thresholds:
    """Limits on how far the served FP8 model may be from the bf16 update; mirrors the settings'
    `verification.thresholds`.

    Calibrated in docs/verification-notes.md (`bench/verify.py --table`): over 18 honest updates of
    the tiny Llama / Qwen2 / Qwen3 test models at TP 1 and 2, the largest share of a limit used is
    0.6 (max |Δlogit|, Qwen2), and every planted fault that a sharding or quantization bug makes
    (a block's scale x1000, swapped fp8 data, scales from the wrong rank, row-parallel scales cut
    on the wrong dim) breaks mean KL by 5x or more. The KL limits leave room for real checkpoints,
    whose FP8 error is expected to be a few times the test models'.
    """

    max_mean_kl: float = 0.03
    max_max_kl: float = 1.0
    min_top1: float = 0.8
    max_abs_logit_diff: float = 5.0
    # Relative RMS error of a shipped tensor against the update, per 128x128 block (per row for
    # per-channel and bf16 tensors). An honest e4m3 rounding stays below 2**-4 in every block
    # (see weight_error), whatever the model, so this limit needs no calibration.
    max_weight_error: float = 2.0**-4

    def __post_init__(self) -> None:
        for name in ("max_mean_kl", "max_max_kl", "max_abs_logit_diff", "max_weight_error"):
            if not getattr(self, name) > 0:
                raise ValueError(f"threshold {name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.min_top1 <= 1.0:
            raise ValueError(f"threshold min_top1 must lie in [0, 1], got {self.min_top1}")

    def usage(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The share of each limit a result uses: 1.0 sits on the limit, above 1.0 fails.

        For top-1 agreement the share is of the allowed disagreement, (1 - top1) / (1 - min_top1).
        """
        allowed_disagreement = 1.0 - self.min_top1
        disagreement = 1.0 - metrics["top1_agreement"]
        if allowed_disagreement > 0:
            top1 = disagreement / allowed_disagreement
        else:
            top1 = math.inf if disagreement > 0 else 0.0
        used = {
            "mean_kl": _share(metrics["mean_kl"], self.max_mean_kl),
            "max_kl": _share(metrics["max_kl"], self.max_max_kl),
            "top1_agreement": top1,
            "max_abs_logit_diff": _share(metrics["max_abs_logit_diff"], self.max_abs_logit_diff),
        }
        if "max_weight_error" in metrics:
            used["max_weight_error"] = _share(metrics["max_weight_error"], self.max_weight_error)
        return used

    def violations(self, metrics: Mapping[str, float]) -> list[str]:
        """One sentence per limit the metrics break; empty when they pass."""
        limits = {
            "mean_kl": ("<=", self.max_mean_kl),
            "max_kl": ("<=", self.max_max_kl),
            "top1_agreement": (">=", self.min_top1),
            "max_abs_logit_diff": ("<=", self.max_abs_logit_diff),
            "max_weight_error": ("<=", self.max_weight_error),
        }
        used = self.usage(metrics)
        return [
            f"{name} {metrics[name]:.4g} (limit {op} {limit:g})"
            for name, (op, limit) in limits.items()
            if name in used and not used[name] <= 1.0  # NaN fails too
        ]


@dataclass(frozen=True)
class DriftThresholds:
    """The optional drift check: mean KL(previous bf16 || new bf16) on the probe, in nats."""

    max_mean_kl: float = 1.0

    def __post_init__(self) -> None:
        if not self.max_mean_kl > 0:
            raise ValueError(f"drift max_mean_kl must be positive, got {self.max_mean_kl}")


@dataclass
class VerificationReport:
    """What verification found; stored with the version either way."""

    passed: bool
    metrics: dict[str, float]
    reason: str | None
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    # The shipped tensor with the largest max_weight_error.
    worst_tensor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; a non-finite metric is written as a string ("inf", "nan")."""
        out = asdict(self)
        for key in ("metrics", "usage"):
            out[key] = {k: v if math.isfinite(v) else str(v) for k, v in out[key].items()}
        return out


def expected_tensors(config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Name -> (shape, accepted dtypes) of every tensor an update of this model must carry.

    Built from the config alone (on the meta device). A tied lm_head is not expected: it is the
    embedding.
    """
    model = build_model(config)
    return {name: (shape, UPDATE_DTYPES) for name, shape in expected_shapes(model).items()}


def check_structure(state: Mapping[str, torch.Tensor], expected: Expected) -> None:
    """Raise InvalidUpdate, naming the tensors, unless `state` is what `expected` describes.

    Checks, all reported at once: missing tensors, unexpected tensors, wrong shapes, wrong dtypes
    (an expected entry may accept several dtypes), and NaN or Inf in any floating tensor.
    """
    problems = []
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing:
        problems.append(f"missing tensors: {some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {some(unexpected)}")
    wrong_shape = []
    wrong_dtype = []
    for name, (shape, dtypes) in expected.items():
        tensor = state.get(name)
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(shape):
            wrong_shape.append(f"{name} is {list(tensor.shape)}, expected {list(shape)}")
        accepted = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        if tensor.dtype not in accepted:
            wanted = " or ".join(_dtype_name(d) for d in accepted)
            wrong_dtype.append(f"{name} is {_dtype_name(tensor.dtype)}, expected {wanted}")
    if wrong_shape:
        problems.append(f"wrong shape: {some(wrong_shape)}")
    if wrong_dtype:
        problems.append(f"wrong dtype: {some(wrong_dtype)}")
    # Only tensors of an accepted dtype: another dtype is reported above and cannot be cast.
    non_finite = find_non_finite({n: t for n, t in state.items() if t.dtype in UPDATE_DTYPES})
    if non_finite:
        problems.append(f"NaN or Inf (or a value beyond bf16's range) in: {some(non_finite)}")
    if problems:
        raise InvalidUpdate("update rejected: " + "; ".join(problems))


def check_artifacts(quantized: Mapping[str, torch.Tensor], plan: ModelPlan) -> list[str]:
    """Problems of the unsharded shipped tensors against the plan; empty when they fit.

    Quantized weights must be fp8 with an fp32 scale of the plan's shape and finite values; every
    other tensor bf16 of its shape.
    """
    expected = plan.shipped_shapes(None)
    problems = []
    missing = [name for name in expected if name not in quantized]
    unexpected = [name for name in quantized if name not in expected]
    if missing:
        problems.append(f"missing: {some(missing)}")
    if unexpected:
        problems.append(f"unexpected: {some(unexpected)}")
    dtypes: dict[str, torch.dtype] = {}
    for tensor in plan.tensors.values():
        if tensor.scheme is Scheme.NONE:
            dtypes[tensor.name] = torch.bfloat16
        else:
            dtypes[tensor.name] = FP8_DTYPE
            dtypes[scale_name(tensor)] = torch.float32
    wrong = []
    for name, shape in expected.items():
        t = quantized.get(name)
        if t is None:
            continue
        if tuple(t.shape) != tuple(shape):
            wrong.append(f"{name} is {list(t.shape)}, expected {list(shape)}")
        elif t.dtype != dtypes[name]:
            wrong.append(f"{name} is {_dtype_name(t.dtype)}, expected {_dtype_name(dtypes[name])}")
        elif t.dtype == torch.float32 and not bool(torch.isfinite(t).all()):
            wrong.append(f"{name} holds NaN or Inf")
    if wrong:
        problems.append(some(wrong))
    return problems


def weight_error(
    bf16_state: Mapping[str, torch.Tensor],
    quantized: Mapping[str, torch.Tensor],
    plan: ModelPlan,
    device: torch.device,
) -> tuple[float, str | None]:
    """The worst relative RMS error of a shipped tensor against the update, and its name.

    Measured per scale unit: per 128x128 block for blockwise weights, per row for per-channel
    weights and for 2-D bf16 tensors (an embedding's vocab rows), per tensor for 1-D ones. The
    reference is the update cast to bf16, the quantizer's own input. An honest e4m3 quantization
    rounds each normal value to within 2**-4 of itself, and a value below the normal range (under
    amax / 28672 of its block) to within 2**-10 of the scale, a contribution under 1e-7 of the
    block's mean square: so every unit stays below 2**-4, whatever the model. A wrong scale, swapped
    data or a shard from the wrong place does not.
    """
    worst = 0.0
    worst_name: str | None = None
    for tensor in plan.tensors.values():
        ref = bf16_state[tensor.name].to(device=device, dtype=torch.bfloat16).float()
        shipped = quantized[tensor.name].to(device)
        if tensor.scheme is Scheme.BLOCKWISE:
            scale = quantized[scale_name(tensor)].to(device)
            got = dequantize_blockwise(shipped, scale, dtype=torch.float32)
            err = _unit_error(_blocks(got - ref), _blocks(ref))
        elif tensor.scheme is Scheme.PER_CHANNEL:
            scale = quantized[scale_name(tensor)].to(device)
            got = dequantize_per_channel(shipped, scale, dtype=torch.float32)
            err = _unit_error(got - ref, ref)
        else:
            got = shipped.float()
            diff, ref2 = (got - ref, ref) if ref.dim() == 2 else ((got - ref)[None], ref[None])
            err = _unit_error(diff.reshape(diff.shape[0], -1), ref2.reshape(ref2.shape[0], -1))
        if not err <= worst:  # NaN counts as the worst
            worst, worst_name = err, tensor.name
        if math.isnan(worst):
            break
    return worst, worst_name


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """[M, N] -> [blocks, elements]; zero padding adds nothing to a block's sums."""
    m, n = x.shape
    mb, nb = -(-m // BLOCK), -(-n // BLOCK)
    padded = torch.nn.functional.pad(x, (0, nb * BLOCK - n, 0, mb * BLOCK - m))
    return padded.view(mb, BLOCK, nb, BLOCK).permute(0, 2, 1, 3).reshape(mb * nb, -1)


def _unit_error(diff: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows of ||diff_row|| / ||ref_row||; 0/0 is 0, x/0 and NaN are inf."""
    if diff.numel() == 0:
        return 0.0
    num = diff.square().sum(dim=-1)
    den = ref.square().sum(dim=-1)
    if not bool(torch.isfinite(num).all()):
        return math.inf
    zero_ref = den == 0
    if bool((zero_ref & (num > 0)).any()):
        return math.inf
    ratio = num / torch.where(zero_ref, torch.ones_like(den), den)
    return math.sqrt(float(ratio.max()))


def verify(
    config: Mapping[str, Any],
    bf16_state: Mapping[str, torch.Tensor],
    rank_shards: Sequence[Mapping[str, torch.Tensor]],
    plan: ModelPlan,
    probe: torch.Tensor,
    thresholds: Thresholds,
    *,
    previous_state: Mapping[str, torch.Tensor] | None = None,
    drift: DriftThresholds | None = None,
    device: torch.device | str | None = None,
) -> VerificationReport:
    """Score the shards that will ship against the bf16 update on the probe batch.

    `config` is the model's config.json; `bf16_state` the update as sent (bf16, fp16 or fp32);
    `rank_shards` what each rank will load, made from it with `plan`; `probe` token ids
    [batch, seq]. The drift check runs when both `drift` and `previous_state` are given. Runs on
    `device` (default: where the update's tensors are).

    Raises InvalidUpdate when the update's structure is wrong. Otherwise returns a report; its
    `passed` is False, with the reason, when the shards cannot be put back together or do not
    match the plan, or a metric breaks its threshold. All metrics are computed either way.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    target = torch.device(device) if device is not None else _device_of(bf16_state)
    metrics: dict[str, float] = {}
    worst_tensor: str | None = None

    def finish(reasons: list[str]) -> VerificationReport:
        usage = thresholds.usage(metrics) if "mean_kl" in metrics else {}
        report = VerificationReport(
            passed=not reasons,
            metrics=metrics,
            reason="; ".join(reasons) if reasons else None,
            seconds=time.perf_counter() - started,
            timings=timings,
            usage=usage,
            thresholds=asdict(thresholds),
            worst_tensor=worst_tensor,
        )
        log = logger.info if report.passed else logger.warning
        log("verification %s in %.2fs: %s", "passed" if report.passed else "FAILED",
            report.seconds, report.reason or _summary(metrics))  # fmt: skip
        return report

    with _timed(timings, "build"):
        model = build_model(config)
        expected = {name: (shape, UPDATE_DTYPES) for name, shape in expected_shapes(model).items()}
    with _timed(timings, "structure"):
        check_structure(bf16_state, expected)

    with _timed(timings, "unshard"):
        problem = _artifact_problem(rank_shards, plan, expected)
        quantized: dict[str, torch.Tensor] = {}
        if problem is None:
            try:
                quantized = unshard(rank_shards, plan)
            except (ValueError, KeyError, IndexError, RuntimeError) as exc:
                problem = f"rank shards cannot be put back together: {exc}"
        if problem is None:
            found = check_artifacts(quantized, plan)
            if found:
                problem = "shipped tensors do not match the plan: " + "; ".join(found)
    if problem is not None:
        return finish([problem])

    with _timed(timings, "weights"):
        metrics["max_weight_error"], worst_tensor = weight_error(
            bf16_state, quantized, plan, target
        )

    with _timed(timings, "reference"):
        load_weights(model, bf16_state, target)
        reference = forward_logits(model, probe)

    reasons = []
    if drift is not None and previous_state is not None:
        with _timed(timings, "drift"):
            check_structure(previous_state, expected)
            load_weights(model, previous_state, target)
            previous = forward_logits(model, probe)
            metrics["drift_mean_kl"] = logit_metrics(previous, reference)["mean_kl"]
            del previous
        if not metrics["drift_mean_kl"] <= drift.max_mean_kl:
            reasons.append(
                f"the bf16 update drifts from the previous version: drift_mean_kl "
                f"{metrics['drift_mean_kl']:.4g} (limit <= {drift.max_mean_kl:g})"
            )

    with _timed(timings, "candidate"):
        install_fp8(model, quantized, plan, target)
        del quantized
        candidate = forward_logits(model, probe)
    del model

    with _timed(timings, "compare"):
        metrics.update(logit_metrics(reference, candidate))
    broken = thresholds.violations(metrics)
    if broken:
        if worst_tensor is not None and any(b.startswith("max_weight_error") for b in broken):
            broken = [
                f"{b} in {worst_tensor}" if b.startswith("max_weight_error") else b for b in broken
            ]
        reasons.insert(0, "served FP8 model differs from the bf16 update: " + "; ".join(broken))
    return finish(reasons)


def _artifact_problem(
    rank_shards: Sequence[Mapping[str, torch.Tensor]], plan: ModelPlan, expected: Expected
) -> str | None:
    if len(rank_shards) != plan.tp_size:
        return f"{len(rank_shards)} rank shards for a plan of tp_size {plan.tp_size}"
    planned = set(plan.tensors)
    needed = set(expected)
    if planned != needed:
        extra = sorted(planned - needed)
        lacking = sorted(needed - planned)
        return (
            "the plan does not match the model: "
            f"planned but not in the model: {some(extra) or '-'}; "
            f"in the model but not planned: {some(lacking) or '-'}"
        )
    return None


def _device_of(state: Mapping[str, torch.Tensor]) -> torch.device:
    for tensor in state.values():
        return tensor.device
    return torch.device("cpu")


def _share(value: float, limit: float) -> float:
    return value / limit


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _summary(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start


__all__ = [
    "UPDATE_DTYPES",
    "DriftThresholds",
    "Thresholds",
    "VerificationReport",
    "check_artifacts",
    "check_structure",
    "expected_tensors",
    "probe_batch",
    "verify",
    "weight_error",
]
