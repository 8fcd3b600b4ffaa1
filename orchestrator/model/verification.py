"""Verify an update against BF16 reference logits before any rank sees it.

In order:
1. Structure of the update as sent, before any math: every tensor the model needs, nothing else,
   the right shapes, a floating dtype, no NaN or Inf. A failure raises InvalidUpdate naming the
   tensors: the trainer sent something wrong.
2. Structure of the very per-rank shards that will ship: the names, shapes and dtypes the plan
   gives each rank (metadata only).
3. The weight check: every rank's piece of every shipped tensor, dequantized, within FP8's
   rounding bound of the same piece of the update (one fused pass, kernels/weight_error.py);
   an unquantized tensor must equal the update exactly.
4. Logits of the model as the ranks will serve it (FP8 weights and scales straight from those
   shards, activations quantized as SGLang's FP8 linear layers do) against the same update in
   bf16, one decoder layer at a time.
A failure in 2-4 gives a report with passed=False, the metrics and the reason: quantization or
sharding went wrong, and no rank may change.

Built once per deployment (`Verifier`, one per config and device): two Hugging Face models on the
meta device, the reference and the candidate, whose decoder layers get their weights only while
they run (forward hooks), as views of the caller's tensors where no cast is needed. So
verification needs one layer of each beyond what the caller holds, plus the vocab-sized logits;
and nothing waits for the GPU until the metrics are gathered at the end.

The gate judges the quantization, not the training step; the optional drift check (off by
default) compares the new bf16 logits with the previous version's, for trainers that want a guard
against a blown-up step. Thresholds and their calibration: docs/verification-notes.md.

Torch and transformers only: the bench machine has neither pydantic-settings nor redis, so
thresholds are plain dataclasses built from the settings by the caller.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from kernels.finite import find_non_finite
from kernels.fp8 import BLOCK
from kernels.weight_error import Item, Unit, weight_errors
from orchestrator.errors import ConfigError, InvalidUpdate
from orchestrator.model.gemm import Gemm, select_gemm
from orchestrator.model.hf_model import (
    build_model,
    expected_shapes,
    materialize_buffers,
    tied_sources,
)
from orchestrator.model.planner import ModelPlan, Scheme, Split, TensorPlan, scale_name
from orchestrator.model.probe import TOP1_MARGIN_NATS, logit_metrics, probe_batch
from orchestrator.model.served import (
    ActivationCache,
    RowPiece,
    ServedLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
)
from orchestrator.model.structure import (
    UPDATE_DTYPES,
    Expected,
    compare,
    described,
    shipped_specs,
)
from orchestrator.text import some

logger = logging.getLogger("refitd.verification")

BF16 = torch.bfloat16
Shards = Sequence[Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class Thresholds:
    """Limits on how far the served FP8 model may be from the bf16 update; mirrors the settings'
    `verification.thresholds`. Calibrated in docs/verification-notes.md (`bench/verify.py
    --table`) on trained, trained-looking and random-init models at TP 1, 2 and 4.
    """

    max_mean_kl: float = 0.05
    max_max_kl: float = 1.0
    # Share of probe positions whose served top token is the reference's, or one the reference
    # scores within top1_margin_nats of its own top token (a near-tie: either may win).
    min_top1_near_agreement: float = 0.9
    top1_margin_nats: float = TOP1_MARGIN_NATS
    max_abs_logit_diff: float = 5.0
    # Relative RMS error of a shipped tensor against the update, per 128x128 block (per row for
    # per-channel and bf16 tensors). An honest e4m3 rounding stays below 2**-4 in every block
    # (see kernels/weight_error.py), whatever the model, so this limit needs no calibration.
    max_weight_error: float = 2.0**-4

    def __post_init__(self) -> None:
        for name in (
            "max_mean_kl",
            "max_max_kl",
            "max_abs_logit_diff",
            "max_weight_error",
            "top1_margin_nats",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"threshold {name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.min_top1_near_agreement <= 1.0:
            raise ValueError(
                "threshold min_top1_near_agreement must lie in [0, 1], "
                f"got {self.min_top1_near_agreement}"
            )

    def usage(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The share of each limit a result uses: 1.0 sits on the limit, above 1.0 fails.

        For the agreement the share is of the allowed disagreement:
        (1 - top1_near_agreement) / (1 - min_top1_near_agreement).
        """
        allowed = 1.0 - self.min_top1_near_agreement
        disagreement = 1.0 - metrics["top1_near_agreement"]
        top1 = disagreement / allowed if allowed > 0 else math.inf if disagreement > 0 else 0.0
        used = {
            "mean_kl": metrics["mean_kl"] / self.max_mean_kl,
            "max_kl": metrics["max_kl"] / self.max_max_kl,
            "top1_near_agreement": top1,
            "max_abs_logit_diff": metrics["max_abs_logit_diff"] / self.max_abs_logit_diff,
        }
        if "max_weight_error" in metrics:
            used["max_weight_error"] = metrics["max_weight_error"] / self.max_weight_error
        return used

    def violations(self, metrics: Mapping[str, float]) -> list[str]:
        """One sentence per limit the metrics break; empty when they pass."""
        limits = {
            "mean_kl": ("<=", self.max_mean_kl),
            "max_kl": ("<=", self.max_max_kl),
            "top1_near_agreement": (">=", self.min_top1_near_agreement),
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
    # How the FP8 products were computed (emulated, or torch._scaled_mm on the GPU).
    gemm: str = ""

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
    problems = compare(described(state), expected).problems()
    # Only tensors of an accepted dtype: another dtype is reported above and cannot be cast.
    floating = {n: t for n, t in state.items() if t.dtype in UPDATE_DTYPES}
    non_finite = [] if _all_finite(floating.values()) else find_non_finite(floating)
    if non_finite:
        problems.append(f"NaN or Inf (or a value beyond bf16's range) in: {some(non_finite)}")
    if problems:
        raise InvalidUpdate("update rejected: " + "; ".join(problems))


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether no tensor holds NaN or Inf or a value beyond bf16's range, in a few fused
    launches (one per dtype and device) and one wait: find_non_finite names the culprits, but
    costs a few launches per tensor, so it runs only when this says no."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():  # the max-norm of nothing is undefined
            groups.setdefault((t.dtype, t.device), []).append(t)
    flags = []
    for group in groups.values():
        # The largest magnitude per tensor: NaN propagates, Inf is Inf, and a value overflows in
        # bf16 exactly when the largest magnitude does (rounding is monotone).
        peaks = torch.stack(torch._foreach_norm(group, math.inf)).to(BF16)
        flags.append(torch.isfinite(peaks).all().to("cpu", non_blocking=False))
    return all(bool(flag) for flag in flags)


# Per-call state --------------------------------------------------------------------------------


@dataclass
class _Call:
    """One verification's inputs, as the hooks read them."""

    state: Mapping[str, torch.Tensor]
    shards: Shards
    plan: ModelPlan


class _Slot:
    """Where a checkpoint tensor lives in a model: the module and the attribute."""

    def __init__(self, model: nn.Module, name: str) -> None:
        parent, _, attr = name.rpartition(".")
        self.module = model.get_submodule(parent)
        self.attr = attr
        self.name = name
        self.empty = getattr(self.module, attr)  # the meta tensor it goes back to

    def put(self, tensor: torch.Tensor) -> None:
        # Straight into _parameters: a plain tensor (no Parameter wrapper, no copy, no autograd).
        self.module._parameters[self.attr] = tensor  # type: ignore[assignment]

    def clear(self) -> None:
        self.module._parameters[self.attr] = self.empty


class Verifier:
    """The verification of one model on one device: built once (per deployment), called per
    update. Not for concurrent calls (a lock serializes them)."""

    def __init__(
        self,
        config: Mapping[str, Any],
        device: torch.device | str = "cpu",
        *,
        gemm: Gemm | None = None,
    ) -> None:
        """`gemm`: how to compute the FP8 products; default `select_gemm(device)`."""
        started = time.perf_counter()
        self.config = dict(config)
        self.device = _indexed(torch.device(device))
        self.reference = build_model(config)
        self.expected: dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]] = {
            name: (shape, UPDATE_DTYPES) for name, shape in expected_shapes(self.reference).items()
        }
        self.candidate = build_model(config)
        self.gemm: Gemm = gemm if gemm is not None else select_gemm(self.device)
        self._lock = threading.Lock()
        self._call: _Call | None = None
        self._source: Mapping[str, torch.Tensor] | None = None  # the reference's weights now

        self._ref_layers = _decoder_layers(self.reference)
        self._cand_layers = _decoder_layers(self.candidate)
        n_layers = len(self._ref_layers)
        self._layer_names: list[list[str]] = [[] for _ in range(n_layers)]
        self._outer_names: list[str] = []
        for name in self.expected:
            index = _layer_index(name)
            (self._layer_names[index] if index is not None else self._outer_names).append(name)

        tied = tied_sources(self.reference)
        self._ref_slots = [[_Slot(self.reference, n) for n in names] for names in self._layer_names]
        self._ref_outer = [_Slot(self.reference, n) for n in self._outer_names]
        self._ref_tied = [(_Slot(self.reference, t), s) for t, s in tied.items()]

        # The candidate: every Linear of a decoder layer served from the shards; the vocab-parallel
        # embedding and lm_head from the ranks' slices; norms and the like as plain tensors.
        self._served: list[dict[str, ServedLinear]] = []
        self._caches: list[ActivationCache] = []
        for index, layer in enumerate(self._cand_layers):
            cache = ActivationCache()
            served = {}
            for sub, module in list(layer.named_modules()):
                if isinstance(module, nn.Linear):
                    replacement = ServedLinear(
                        module.in_features, module.out_features, self.gemm, cache
                    )
                    _replace(layer, sub, replacement)
                    served[f"{_LAYERS}.{index}.{sub}"] = replacement
            self._served.append(served)
            self._caches.append(cache)
        self._cand_slots = [
            [_Slot(self.candidate, n) for n in names if n.rpartition(".")[0] not in served]
            for names, served in zip(self._layer_names, self._served, strict=True)
        ]
        self._embedding_name = _find(self._outer_names, "embed_tokens.weight")
        self._embedding = VocabParallelEmbedding()
        _replace(self.candidate, self._embedding_name.removesuffix(".weight"), self._embedding)
        self._head = VocabParallelHead()
        _replace(self.candidate, "lm_head", self._head)
        self._head_source = "lm_head.weight" if "lm_head.weight" in self.expected else None
        self._cand_outer = [
            _Slot(self.candidate, n)
            for n in self._outer_names
            if n != self._embedding_name and n != "lm_head.weight"
        ]
        materialize_buffers(self.reference, self.device)
        materialize_buffers(self.candidate, self.device)
        for index, layer in enumerate(self._ref_layers):
            layer.register_forward_pre_hook(_hook(self._enter_reference, index))
            layer.register_forward_hook(_hook(self._leave_reference, index))
        for index, layer in enumerate(self._cand_layers):
            layer.register_forward_pre_hook(_hook(self._enter_candidate, index))
            layer.register_forward_hook(_hook(self._leave_candidate, index))
        self.build_seconds = time.perf_counter() - started

    # The per-update entry point --------------------------------------------------------------

    def __call__(
        self,
        bf16_state: Mapping[str, torch.Tensor],
        rank_shards: Shards,
        plan: ModelPlan,
        probe: torch.Tensor,
        thresholds: Thresholds,
        *,
        previous_state: Mapping[str, torch.Tensor] | None = None,
        drift: DriftThresholds | None = None,
    ) -> VerificationReport:
        """Score the shards that will ship against the bf16 update on the probe batch.

        `bf16_state` is the update as sent (bf16, fp16 or fp32); `rank_shards` what each rank
        will load, made from it with `plan` (never written to); `probe` token ids [batch, seq].
        The drift check runs when both `drift` and `previous_state` are given.

        Raises InvalidUpdate when the update's structure is wrong. Otherwise returns a report;
        its `passed` is False, with the reason, when the shards do not match the plan or a
        metric breaks its threshold. All metrics are computed either way.
        """
        with self._lock:
            return self._verify(
                bf16_state, rank_shards, plan, probe, thresholds, previous_state, drift
            )

    def _verify(
        self,
        state: Mapping[str, torch.Tensor],
        shards: Shards,
        plan: ModelPlan,
        probe: torch.Tensor,
        thresholds: Thresholds,
        previous_state: Mapping[str, torch.Tensor] | None,
        drift: DriftThresholds | None,
    ) -> VerificationReport:
        started = time.perf_counter()
        clock = _Clock(self.device)
        metrics: dict[str, float] = {}
        worst: list[str | None] = [None]

        def finish(reasons: list[str]) -> VerificationReport:
            timings = clock.timings()
            usage = thresholds.usage(metrics) if "mean_kl" in metrics else {}
            report = VerificationReport(
                passed=not reasons,
                metrics=metrics,
                reason="; ".join(reasons) if reasons else None,
                seconds=time.perf_counter() - started,
                timings=timings,
                usage=usage,
                thresholds=asdict(thresholds),
                worst_tensor=worst[0],
                gemm=self.gemm.name,
            )
            log = logger.info if report.passed else logger.warning
            log("verification %s in %.3fs: %s", "passed" if report.passed else "FAILED",
                report.seconds, report.reason or _summary(metrics))  # fmt: skip
            return report

        check_structure(state, self.expected)
        clock.mark("structure")
        problem = self._shard_problem(shards, plan)
        clock.mark("shard structure")
        if problem is not None:
            return finish([problem])

        call = _Call(state, shards, plan)
        self._call = call
        try:
            checked = self._weight_check(call)
            clock.mark("weights")
            reference = self._reference_logits(state, probe)
            clock.mark("reference")
            previous = None
            if drift is not None and previous_state is not None:
                check_structure(previous_state, self.expected)
                previous = self._reference_logits(previous_state, probe)
                clock.mark("drift")
            candidate = self._candidate_logits(probe)
            clock.mark("candidate")
        finally:
            self._call = None
            self._source = None

        reasons = []
        # The metrics, gathered: the first waits for the GPU.
        weight_reasons, metrics["max_weight_error"], worst[0] = checked.finish(call)
        metrics.update(logit_metrics(reference, candidate, margin=thresholds.top1_margin_nats))
        if previous is not None:
            assert drift is not None
            metrics["drift_mean_kl"] = logit_metrics(previous, reference)["mean_kl"]
        clock.mark("compare")
        broken = thresholds.violations(metrics)
        if broken:
            broken = [
                f"{b} in {worst[0]}" if b.startswith("max_weight_error") and worst[0] else b
                for b in broken
            ]
            reasons.append("served FP8 model differs from the bf16 update: " + "; ".join(broken))
        reasons.extend(weight_reasons)
        if previous is not None:
            assert drift is not None
            if not metrics["drift_mean_kl"] <= drift.max_mean_kl:
                reasons.append(
                    f"the bf16 update drifts from the previous version: drift_mean_kl "
                    f"{metrics['drift_mean_kl']:.4g} (limit <= {drift.max_mean_kl:g})"
                )
        return finish(reasons)

    # 2. The shards' structure ----------------------------------------------------------------

    def _shard_problem(self, shards: Shards, plan: ModelPlan) -> str | None:
        if len(shards) != plan.tp_size:
            return f"{len(shards)} rank shards for a plan of tp_size {plan.tp_size}"
        planned, needed = set(plan.tensors), set(self.expected)
        if planned != needed:
            return (
                "the plan does not match the model: "
                f"planned but not in the model: {some(sorted(planned - needed)) or '-'}; "
                f"in the model but not planned: {some(sorted(needed - planned)) or '-'}"
            )
        found = []
        for rank, shard in enumerate(shards):
            mismatch = compare(described(shard), shipped_specs(plan, rank))
            if mismatch:
                found.append(f"rank {rank} shard: {mismatch.describe()}")
        if found:
            return "rank shards do not match the plan: " + "; ".join(found)
        return None

    # 3. The weight check ---------------------------------------------------------------------

    def _weight_check(self, call: _Call) -> _Checked:
        """Launch the weight check of every rank's piece of every shipped tensor; nothing waits.

        When the update is bf16 and the shards are on the device, the pieces are views and the
        whole model goes in one call (a few launches); otherwise layer by layer, so only one
        layer's cast or copy is alive.
        """
        state = call.state
        in_place = all(t.dtype == BF16 and t.device == self.device for t in state.values())
        # Shards elsewhere (the CPU) are copied in piece by piece: a layer at a time, then.
        in_place = in_place and all(
            t.device == self.device for shard in call.shards for t in shard.values()
        )
        groups = [list(self.expected)] if in_place else [*self._layer_names, self._outer_names]
        checked = _Checked()
        for names in groups:
            quantized: list[tuple[Item, str]] = []
            plain: list[tuple[Item, str]] = []
            for name in names:
                ref = _bf16(state[name], self.device)
                pieces = list(_items(call, call.plan.tensors[name], ref, self.device))
                into = plain if pieces[0].unit is Unit.PLAIN else quantized
                base = len(into)
                for item in pieces:
                    if item.adds_to is not None:  # an index among this tensor's pieces
                        item = dataclasses.replace(item, adds_to=base + item.adds_to)
                    into.append((item, name))
            # bf16 items go last, so their owners move by the number of quantized ones.
            plain = [
                (
                    i
                    if i.adds_to is None
                    else dataclasses.replace(i, adds_to=i.adds_to + len(quantized)),
                    n,
                )
                for i, n in plain
            ]
            both = quantized + plain
            errors, starts = weight_errors([item for item, _ in both])
            checked.add(errors, starts, [name for _, name in both], len(quantized))
        return checked

    # 4. The logits, one layer at a time ------------------------------------------------------

    @torch.inference_mode()
    def _reference_logits(
        self, state: Mapping[str, torch.Tensor], probe: torch.Tensor
    ) -> torch.Tensor:
        self._source = state
        for slot in self._ref_outer:
            slot.put(_bf16(state[slot.name], self.device))
        for slot, source in self._ref_tied:
            slot.put(_bf16(state[source], self.device))
        try:
            return self.reference(input_ids=probe.to(self.device), use_cache=False).logits
        finally:
            for slot in self._ref_outer:
                slot.clear()
            for slot, _ in self._ref_tied:
                slot.clear()
            for index in range(len(self._ref_layers)):
                self._leave_reference(index)

    @torch.inference_mode()
    def _candidate_logits(self, probe: torch.Tensor) -> torch.Tensor:
        call = self._call
        assert call is not None
        plan, shards = call.plan, call.shards
        embedding = plan.tensors[self._embedding_name]
        self._embedding.load(_vocab_pieces(embedding, shards, self.device))
        head = plan.tensors[self._head_source or self._embedding_name]
        self._head.load([rows for _, rows in _vocab_pieces(head, shards, self.device)])
        for slot in self._cand_outer:
            slot.put(_whole(plan.tensors[slot.name], slot.name, shards, self.device))
        try:
            return self.candidate(input_ids=probe.to(self.device), use_cache=False).logits
        finally:
            self._embedding.release()
            self._head.release()
            for slot in self._cand_outer:
                slot.clear()
            for index in range(len(self._cand_layers)):
                self._leave_candidate(index)

    def _enter_reference(self, index: int) -> None:
        assert self._source is not None
        for slot in self._ref_slots[index]:
            slot.put(_bf16(self._source[slot.name], self.device))

    def _leave_reference(self, index: int) -> None:
        for slot in self._ref_slots[index]:
            slot.clear()

    def _enter_candidate(self, index: int) -> None:
        call = self._call
        assert call is not None
        plan, shards = call.plan, call.shards
        for module_name, linear in self._served[index].items():
            weight = plan.tensors[module_name + ".weight"]
            bias_plan = plan.tensors.get(module_name + ".bias")
            bias = None
            if bias_plan is not None:
                bias = _whole(bias_plan, bias_plan.name, shards, self.device)
            if weight.split is Split.ROW and plan.tp_size > 1:
                pieces = [
                    RowPiece(
                        weight.ranges[rank],
                        _on(shards[rank][weight.name], self.device),
                        None
                        if weight.scheme is Scheme.NONE
                        else _on(shards[rank][scale_name(weight)], self.device),
                    )
                    for rank in range(plan.tp_size)
                ]
                linear.load(weight.scheme, None, None, bias, pieces)
            elif weight.scheme is Scheme.NONE:
                data = _whole(weight, weight.name, shards, self.device)
                linear.load(Scheme.NONE, data, None, bias)
            else:
                data = _whole(weight, weight.name, shards, self.device)
                scale = _whole(weight, scale_name(weight), shards, self.device)
                linear.load(weight.scheme, data, scale, bias)
        for slot in self._cand_slots[index]:
            slot.put(_whole(plan.tensors[slot.name], slot.name, shards, self.device))

    def _leave_candidate(self, index: int) -> None:
        for linear in self._served[index].values():
            linear.release()
        for slot in self._cand_slots[index]:
            slot.clear()
        self._caches[index].clear()


class _Checked:
    """The weight check's results on the device, until `finish` gathers them."""

    def __init__(self) -> None:
        # Per group: [max, argmax] over the quantized units, then over the bf16 ones.
        self.found: list[torch.Tensor] = []
        self.groups: list[tuple[list[int], list[str], int]] = []

    def add(self, errors: torch.Tensor, starts: list[int], owners: list[str], first_plain: int):
        """A group's errors; its items from `first_plain` on are the bf16 (PLAIN) ones."""
        split = starts[first_plain]
        quantized = _max_and_index(errors[:split], 0)
        plain = _max_and_index(errors[split:], split)
        self.found.append(torch.cat([quantized, plain]))
        self.groups.append((starts, owners, first_plain))

    def finish(self, call: _Call) -> tuple[list[str], float, str | None]:
        """(reasons, max_weight_error, the tensor it is in); waits for the device."""
        reasons = []
        worst, worst_name = 0.0, None
        differing = []
        for values, (starts, owners, _) in zip(
            torch.stack(self.found).tolist(), self.groups, strict=True
        ):
            q_value, q_index, p_value, p_index = values
            if q_value > worst or (worst_name is None and q_index >= 0):
                worst, worst_name = q_value, _owner(starts, owners, int(q_index))
            if p_value > worst:
                worst, worst_name = p_value, _owner(starts, owners, int(p_index))
            if p_value != 0:
                differing.append(f"{_owner(starts, owners, int(p_index))} ({p_value:.3g})")
        if differing:
            reasons.append(
                "tensors shipped unquantized differ from the update (relative error): "
                + some(differing)
            )
        if not math.isfinite(worst) and worst_name is not None:
            tensor = call.plan.tensors[worst_name]
            if tensor.scheme is not Scheme.NONE:
                scale = scale_name(tensor)
                if any(not bool(torch.isfinite(s[scale]).all()) for s in call.shards):
                    reasons.append(f"{scale} holds NaN or Inf")
        return reasons, worst, worst_name


def _max_and_index(errors: torch.Tensor, offset: int) -> torch.Tensor:
    """[max, its index + offset] (fp32, on the device); [0, -1] when empty."""
    if errors.numel() == 0:
        return torch.stack([errors.new_zeros(()), errors.new_full((), -1.0)])
    # NaN cannot occur (the kernel maps it to inf), so max is the worst unit. fp32 holds the
    # index exactly: a model has far fewer than 2**24 units per group.
    value, index = errors.max(dim=0)
    return torch.stack([value, (index + offset).float()])


def _owner(starts: list[int], owners: list[str], unit: int) -> str:
    return owners[bisect.bisect_right(starts, unit) - 1]


def _items(
    call: _Call, tensor: TensorPlan, ref: torch.Tensor, device: torch.device
) -> Iterator[Item]:
    """The weight check's items for every rank's piece of one tensor (every copy of a replicated
    one: each is checked against the update). The pieces of a row-parallel tensor judged by row
    add up to whole rows (`adds_to` counts among this tensor's items)."""
    dim = tensor.split_dim
    unit = {Scheme.BLOCKWISE: Unit.BLOCKS, Scheme.PER_CHANNEL: Unit.ROWS}.get(
        tensor.scheme, Unit.PLAIN
    )
    for rank, shard in enumerate(call.shards):
        data = _on(shard[tensor.name], device)
        scale = None if unit is Unit.PLAIN else _on(shard[scale_name(tensor)], device)
        if dim is None:
            yield _item(ref, data, scale, unit)
            continue
        offset = 0
        for start, stop in tensor.ranges[rank]:
            size = stop - start
            adds_to = (
                0 if dim == 1 and unit is not Unit.BLOCKS and (rank, offset) != (0, 0) else None
            )
            piece_scale = scale
            if unit is Unit.BLOCKS:
                assert scale is not None
                piece_scale = scale.narrow(dim, offset // BLOCK, size // BLOCK)
            elif unit is Unit.ROWS and dim == 0:
                assert scale is not None
                piece_scale = scale.narrow(0, offset, size)
            yield _item(
                ref.narrow(dim, start, size),
                data.narrow(dim, offset, size),
                piece_scale,
                unit,
                adds_to,
            )
            offset += size


def _item(
    ref: torch.Tensor,
    got: torch.Tensor,
    scale: torch.Tensor | None,
    unit: Unit,
    adds_to: int | None = None,
) -> Item:
    if ref.dim() == 1:  # a norm or a bias: one unit for the whole vector
        return Item(ref.view(1, -1), got.view(1, -1), None, unit)
    return Item(ref, got, scale, unit, adds_to)


# Put together what the ranks hold --------------------------------------------------------------


def _whole(tensor: TensorPlan, name: str, shards: Shards, device: torch.device) -> torch.Tensor:
    """The whole of one shipped tensor (`name`: the weight or its scale) from the ranks' pieces,
    by the plan: a view where one rank holds all of it, else one device-to-device copy."""
    dim = tensor.split_dim
    if name != tensor.name and tensor.scheme is Scheme.PER_CHANNEL and dim == 1:
        dim = None  # a row-parallel per-channel scale: every rank holds all of it
    if dim is None:
        return _on(shards[0][name], device)
    per_block = name != tensor.name and tensor.scheme is Scheme.BLOCKWISE
    found: dict[tuple[int, int], torch.Tensor] = {}
    for rank, shard in enumerate(shards):
        offset = 0
        for start, stop in tensor.ranges[rank]:
            a, b, at = (start, stop, offset)
            if per_block:
                a, b, at = a // BLOCK, b // BLOCK, at // BLOCK
            found.setdefault((a, b), shard[name].narrow(dim, at, b - a))
            offset += stop - start
    pieces = [found[key] for key in sorted(found)]
    if len(pieces) == 1:
        return _on(pieces[0], device)
    return torch.cat([_on(p, device) for p in pieces], dim)


def _vocab_pieces(
    tensor: TensorPlan, shards: Shards, device: torch.device
) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """Each rank's vocabulary rows of an embedding or lm_head, with the token range it holds."""
    if tensor.split_dim is None:
        return [((0, tensor.shape[0]), _on(shards[0][tensor.name], device))]
    return [
        (tensor.ranges[rank][0], _on(shard[tensor.name], device))
        for rank, shard in enumerate(shards)
    ]


def _indexed(device: torch.device) -> torch.device:
    """ "cuda" as "cuda:N" (the current device): tensors name their device with its index, and
    torch.device("cuda") != torch.device("cuda:0"), so a bare "cuda" would make every tensor
    look as if it lived elsewhere (the weight check would then go layer by layer, 37 rounds of
    host work instead of one)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


def _bf16(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device and t.dtype == BF16 else t.to(device=device, dtype=BF16)


# Building --------------------------------------------------------------------------------------

_LAYERS = "model.layers"


def _decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    try:
        layers = model.get_submodule(_LAYERS)
    except AttributeError:
        raise ConfigError(
            f"verification streams the decoder layers of {_LAYERS}, which a "
            f"{type(model).__name__} does not have"
        ) from None
    assert isinstance(layers, nn.ModuleList)
    return layers


def _layer_index(name: str) -> int | None:
    if not name.startswith(_LAYERS + "."):
        return None
    return int(name[len(_LAYERS) + 1 :].split(".", 1)[0])


def _find(names: Sequence[str], suffix: str) -> str:
    for name in names:
        if name.endswith(suffix):
            return name
    raise ConfigError(f"the model has no {suffix}")


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _hook(method: Callable[[int], None], index: int) -> Callable[..., None]:
    def hook(*_: Any) -> None:
        method(index)

    return hook


class _Clock:
    """Part timings: CUDA events on a GPU (read once, at the end), wall time on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = [("start", self._now())]

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, name: str) -> None:
        self.marks.append((name, self._now()))

    def timings(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = {}
        for (_, before), (name, after) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = before.elapsed_time(after) / 1e3 if self.cuda else after - before
        return out


# The module-level entry point ------------------------------------------------------------------

_VERIFIERS: OrderedDict[tuple[str, str], Verifier] = OrderedDict()
_VERIFIERS_LOCK = threading.Lock()
# A daemon verifies one model; the bench and the tests switch between a few.
_KEEP = 4


def verifier_for(config: Mapping[str, Any], device: torch.device | str) -> Verifier:
    """The Verifier of this config on this device, built on first use and kept."""
    key = (json.dumps(config, sort_keys=True, default=str), str(_indexed(torch.device(device))))
    with _VERIFIERS_LOCK:
        found = _VERIFIERS.get(key)
        if found is not None:
            _VERIFIERS.move_to_end(key)
            return found
    built = Verifier(config, device)
    with _VERIFIERS_LOCK:
        _VERIFIERS[key] = built
        while len(_VERIFIERS) > _KEEP:
            _VERIFIERS.popitem(last=False)
    return built


def verify(
    config: Mapping[str, Any],
    bf16_state: Mapping[str, torch.Tensor],
    rank_shards: Shards,
    plan: ModelPlan,
    probe: torch.Tensor,
    thresholds: Thresholds,
    *,
    previous_state: Mapping[str, torch.Tensor] | None = None,
    drift: DriftThresholds | None = None,
    device: torch.device | str | None = None,
) -> VerificationReport:
    """`Verifier(config, device)(...)` with the Verifier kept between calls (see Verifier).

    Runs on `device` (default: where the update's tensors are).
    """
    target = torch.device(device) if device is not None else _device_of(bf16_state)
    verifier = verifier_for(config, target)
    return verifier(
        bf16_state, rank_shards, plan, probe, thresholds, previous_state=previous_state, drift=drift
    )


def _device_of(state: Mapping[str, torch.Tensor]) -> torch.device:
    for tensor in state.values():
        return tensor.device
    return torch.device("cpu")


def _summary(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


__all__ = [
    "UPDATE_DTYPES",
    "DriftThresholds",
    "Thresholds",
    "VerificationReport",
    "Verifier",
    "check_structure",
    "expected_tensors",
    "probe_batch",
    "verifier_for",
    "verify",
]
