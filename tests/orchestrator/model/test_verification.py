"""Verification: structure checks, the logit gate, the weight check, drift, on tiny real models.

The models are tiny Llama / Qwen2 / Qwen3 configs built by transformers from config dicts, with
trained-looking random weights (tests/orchestrator/_tiny_models.py); the shards are made by the
real planner, quantizer and sharder. docs/verification-notes.md holds the measured table.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from kernels.fp8 import FP8_MAX
from orchestrator.errors import ConfigError, InvalidUpdate
from orchestrator.model import synthetic
from orchestrator.model.gemm import dequantize_activation_groups, quantize_activation_groups
from orchestrator.model.hf_model import hf_config
from orchestrator.model.planner import ModelPlan, Scheme, scale_name
from orchestrator.model.probe import logit_metrics, probe_batch
from orchestrator.model.verification import (
    DriftThresholds,
    Thresholds,
    VerificationReport,
    check_structure,
    expected_tensors,
    verify,
)
from tests.orchestrator import _tiny_models as tiny


def quantize_activations(x: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Quantize-dequantize `x` to FP8 per token per `group_size` channels, as the served model's
    linears do (SGLang's per_token_group_quant_fp8); fp32 out."""
    flat = x.reshape(-1, x.shape[-1])
    q, scale = quantize_activation_groups(flat, group_size)
    return dequantize_activation_groups(q, scale, group_size).view(x.shape)


FAMILIES = tuple(tiny.CONFIGS)
LOGIT_METRICS = ("mean_kl", "max_kl", "top1_near_agreement", "max_abs_logit_diff")
Shards = list[dict[str, torch.Tensor]]


@functools.cache
def _update(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return synthetic.honest_update(synthetic.base_state(tiny.CONFIGS[family], seed), seed + 100)


@functools.cache
def _shipped(family: str, tp: int, seed: int = 0) -> tuple[ModelPlan, Shards]:
    return tiny.ship(tiny.CONFIGS[family], _update(family, seed), tp)


def _probe(family: str) -> torch.Tensor:
    return probe_batch(tiny.CONFIGS[family]["vocab_size"])


def _verify(family: str, state, shards: Shards, plan: ModelPlan, **kw) -> VerificationReport:
    return verify(tiny.CONFIGS[family], state, shards, plan, _probe(family), Thresholds(), **kw)


def _logit_violations(report: VerificationReport) -> list[str]:
    return [v for v in Thresholds().violations(report.metrics) if v.split()[0] in LOGIT_METRICS]


# The probe batch ------------------------------------------------------------------------------


def test_probe_batch_is_seeded_and_fixed():
    a = probe_batch(512, seed=3, count=8, length=64)
    assert a.shape == (8, 64) and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) < 512
    assert torch.equal(a, probe_batch(512, seed=3, count=8, length=64))
    assert not torch.equal(a, probe_batch(512, seed=4, count=8, length=64))
    assert probe_batch(512).shape == (8, 64)  # the documented default


def test_probe_batch_takes_explicit_sequences_and_checks_them():
    ids = [[1, 2, 3], [4, 5, 6]]
    assert probe_batch(10, token_ids=ids).tolist() == ids
    with pytest.raises(ValueError, match="one length"):
        probe_batch(10, token_ids=[[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match=r"token id 10 at sequence 1, position 2"):
        probe_batch(10, token_ids=[[1, 2, 3], [4, 5, 10]])
    with pytest.raises(ValueError, match="non-empty"):
        probe_batch(10, token_ids=[])


# Activation quantization, as SGLang's per_token_group_quant_fp8 ------------------------------


def test_activations_are_quantized_per_token_per_128_channel_group():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 300, generator=gen)
    x[0, 0, 10] = 1e4  # an outlier in the first group of one token only
    x[1, 2, 128:256] = 0.0  # an all-zero group
    out = quantize_activations(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[1, 2, 128:256], torch.zeros(128))
    # Each group's largest magnitude maps to 448 exactly and comes back exactly.
    assert float(out[0, 0, 10]) == 1e4
    for lo, hi in ((0, 128), (128, 256), (256, 300)):  # the last group is 44 channels
        group = x[2, 3, lo:hi]
        peak = int(group.abs().argmax())
        assert float(out[2, 3, lo + peak]) == pytest.approx(float(group[peak]), rel=1e-6)
    # Other tokens and other groups keep their own scale: e4m3 rounds to within 2**-4.
    normal = x.abs() > (x.abs().amax() / FP8_MAX) * 2.0**-6 * 1e-3
    rel = ((out - x).abs() / x.abs().clamp_min(1e-30))[1:]
    assert float(rel[normal[1:]].max()) <= 2.0**-4 + 1e-6
    # The outlier's group loses precision; its neighbours in the next group do not.
    first = ((out - x).abs() / x.abs())[0, 0, :128]
    second = ((out - x).abs() / x.abs())[0, 0, 128:256]
    assert float(first.max()) > 0.5 and float(second.max()) <= 2.0**-4 + 1e-6


def test_a_whole_row_group_is_one_scale_per_token():
    x = torch.tensor([[1.0, 1000.0, 3.0], [2.0, 4.0, 8.0]])
    out = quantize_activations(x, group_size=3)
    assert out[0, 1] == 1000.0 and out[1, 2] == 8.0
    # 1.0 in a group scaled to 1000 is 0.448 in fp8: a step of 2**-5 there, so 1 + ~2%.
    assert abs(float(out[0, 0]) - 1.0) < 0.05


# Logit metrics and thresholds -----------------------------------------------------------------


def test_logit_metrics_of_identical_and_known_logits():
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 3, 7, generator=gen)
    same = logit_metrics(ref, ref.clone())
    assert same == {
        "mean_kl": 0.0,
        "max_kl": 0.0,
        "top1_near_agreement": 1.0,
        "top1_agreement": 1.0,
        "max_top1_regret": 0.0,
        "max_abs_logit_diff": 0.0,
        "tokens": 6.0,
    }
    cand = ref.clone()
    cand[1, 2] = torch.flip(ref[1, 2], dims=[0])
    p, q = torch.log_softmax(ref[1, 2], -1), torch.log_softmax(cand[1, 2], -1)
    kl = float((p.exp() * (p - q)).sum())
    m = logit_metrics(ref, cand)
    assert m["max_kl"] == pytest.approx(kl, rel=1e-5)
    assert m["mean_kl"] == pytest.approx(kl / 6, rel=1e-5)
    assert m["max_abs_logit_diff"] == pytest.approx(float((cand - ref).abs().max()))
    flipped_top = int(ref[1, 2].argmax()) != int(cand[1, 2].argmax())
    assert m["top1_agreement"] == pytest.approx((6 - flipped_top) / 6)
    # Only the flipped row may regret its choice: what the reference gives up by taking it.
    regret = float(ref[1, 2].max() - ref[1, 2, int(cand[1, 2].argmax())])
    assert m["max_top1_regret"] == pytest.approx(regret, rel=1e-5)
    assert m["top1_near_agreement"] == pytest.approx((6 - (regret > 1.0)) / 6)


def test_near_ties_flipped_by_rounding_are_not_disagreements():
    # Two positions: one near-tie (0.3 nats apart) that the candidate flips, one clear choice
    # (3 nats apart) that it flips too. Only the second is a disagreement.
    ref = torch.tensor([[[2.0, 1.7, -5.0], [4.0, 1.0, -5.0]]])
    cand = torch.tensor([[[1.7, 2.0, -5.0], [1.0, 4.0, -5.0]]])
    m = logit_metrics(ref, cand)
    assert m["top1_agreement"] == 0.0
    assert m["top1_near_agreement"] == 0.5
    assert m["max_top1_regret"] == pytest.approx(3.0, rel=1e-6)
    # The margin is the threshold's: with 0.2 nats the near-tie counts as well.
    assert logit_metrics(ref, cand, margin=0.2)["top1_near_agreement"] == 0.0
    assert logit_metrics(ref, cand, margin=3.5)["top1_near_agreement"] == 1.0


def test_non_finite_logits_fail_every_threshold():
    ref = torch.zeros(1, 2, 4)
    cand = ref.clone()
    cand[0, 1, 2] = float("nan")
    m = logit_metrics(ref, cand)
    assert math.isinf(m["mean_kl"]) and m["top1_near_agreement"] == 0.0
    assert len(Thresholds().violations(m)) == 4


def test_thresholds_usage_and_violations():
    t = Thresholds(
        max_mean_kl=0.1, max_max_kl=1.0, min_top1_near_agreement=0.8, max_abs_logit_diff=4.0
    )
    metrics = {
        "mean_kl": 0.05,
        "max_kl": 2.0,
        "top1_near_agreement": 0.9,
        "max_abs_logit_diff": 1.0,
    }
    assert t.usage(metrics) == pytest.approx(
        {"mean_kl": 0.5, "max_kl": 2.0, "top1_near_agreement": 0.5, "max_abs_logit_diff": 0.25}
    )
    assert t.violations(metrics) == ["max_kl 2 (limit <= 1)"]
    with pytest.raises(ValueError, match="min_top1_near_agreement"):
        Thresholds(min_top1_near_agreement=1.5)
    with pytest.raises(ValueError, match="max_mean_kl"):
        Thresholds(max_mean_kl=0)
    with pytest.raises(ValueError, match="top1_margin_nats"):
        Thresholds(top1_margin_nats=0)


# Building models from config.json -------------------------------------------------------------


def test_expected_tensors_come_from_the_config_alone():
    expected = expected_tensors(tiny.CONFIGS["qwen2"])
    assert "lm_head.weight" not in expected  # tied to the embedding
    assert expected["model.layers.0.self_attn.q_proj.bias"][0] == (256,)
    assert expected["model.layers.1.mlp.down_proj.weight"][0] == (256, 640)
    assert set(expected) == set(_update("qwen2"))
    assert expected_tensors(tiny.CONFIGS["qwen3"])["lm_head.weight"][0] == (512, 256)


def test_a_config_that_names_no_model_is_refused():
    with pytest.raises(ConfigError, match="model_type"):
        hf_config({"hidden_size": 8})
    with pytest.raises(ConfigError, match="not-a-model"):
        hf_config({"model_type": "not-a-model"})


# Structure of the update as sent --------------------------------------------------------------


def _nan(state: dict) -> str:
    name = "model.layers.1.self_attn.v_proj.weight"
    state[name] = state[name].clone()
    state[name][3, 7] = float("nan")
    return name


def _inf(state: dict) -> str:
    name = "model.norm.weight"
    state[name] = state[name].clone()
    state[name][0] = float("-inf")
    return name


def _missing(state: dict) -> str:
    name = "model.layers.0.mlp.up_proj.weight"
    del state[name]
    return name


def _unexpected(state: dict) -> str:
    name = "model.layers.2.mlp.up_proj.weight"
    state[name] = state["model.layers.1.mlp.up_proj.weight"].clone()
    return name


def _wrong_shape(state: dict) -> str:
    name = "model.layers.0.self_attn.k_proj.weight"
    state[name] = state[name][:, :128].clone()
    return name


def _wrong_dtype(state: dict) -> str:
    name = "model.layers.0.self_attn.o_proj.weight"
    state[name] = state[name].to(torch.float8_e4m3fn)  # a pre-quantized tensor sent as weights
    return name


@pytest.mark.parametrize(
    ("plant", "reason"),
    [
        (_nan, "NaN or Inf"),
        (_inf, "NaN or Inf"),
        (_missing, "missing tensors"),
        (_unexpected, "unexpected tensors"),
        (_wrong_shape, r"wrong shape: \S+ has shape \[256, 128\], expected \[256, 256\]"),
        (_wrong_dtype, r"wrong dtype: \S+ is float8_e4m3fn, expected bfloat16, float16 or float32"),
    ],
    ids=["nan", "inf", "missing", "unexpected", "wrong-shape", "wrong-dtype"],
)
def test_structural_faults_are_rejected_before_any_math(plant, reason):
    family = "llama"
    state = dict(_update(family))
    name = plant(state)
    config = tiny.CONFIGS[family]
    with pytest.raises(InvalidUpdate, match=reason) as caught:
        check_structure(state, expected_tensors(config))
    assert name in caught.value.message
    assert caught.value.message.count(";") == 0  # one problem, not a cascade of them
    plan, shards = _shipped(family, 1)
    with pytest.raises(InvalidUpdate, match=reason):
        verify(config, state, shards, plan, _probe(family), Thresholds())


def test_structure_reports_every_problem_at_once():
    state = dict(_update("qwen3"))
    names = [_missing(state), _unexpected(state), _nan(state)]
    with pytest.raises(InvalidUpdate) as caught:
        check_structure(state, expected_tensors(tiny.CONFIGS["qwen3"]))
    for name in names:
        assert name in caught.value.message


def test_fp32_and_fp16_updates_are_accepted_and_judged_as_their_bf16_cast():
    family = "qwen3"
    bf16 = _update(family)
    plan, shards = _shipped(family, 2)
    base = _verify(family, bf16, shards, plan)
    fp32 = {n: t.float() for n, t in bf16.items()}
    # The quantizer casts fp32 -> bf16 first, so the same shards are made; the reference too.
    again = _verify(family, fp32, tiny.ship(tiny.CONFIGS[family], fp32, 2)[1], plan)
    assert again.passed and again.metrics == base.metrics
    fp16 = {n: t.half() for n, t in bf16.items()}
    check_structure(fp16, expected_tensors(tiny.CONFIGS[family]))


# The gate on honest updates ------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_honest_updates_pass_with_margin(family, tp):
    plan, shards = _shipped(family, tp)
    if family == "qwen2" and tp == 2:
        # The per-channel fallback is exercised: intermediate 640 -> 320 per rank.
        assert plan.tensors["model.layers.0.mlp.down_proj.weight"].scheme is Scheme.PER_CHANNEL
    before = {n: t.clone() for n, t in _update(family).items()}
    report = _verify(family, _update(family), shards, plan)
    assert report.passed, report.reason
    assert report.reason is None
    # Calibration (docs/verification-notes.md): honest updates use at most ~0.6 of any limit.
    assert max(report.usage.values()) < 0.75, report.usage
    assert report.metrics["top1_agreement"] > 0.9  # logits are spread, not near-tied
    assert report.metrics["top1_near_agreement"] == 1.0
    assert report.metrics["tokens"] == 8 * 64
    assert list(report.timings) == [
        "structure",
        "shard structure",
        "weights",
        "reference",
        "candidate",
        "compare",
    ]
    assert report.gemm == "emulated"
    # The caller's tensors are the model's weights for the reference, but never written to.
    for name, tensor in _update(family).items():
        assert torch.equal(tensor, before[name]), name
    stored = report.to_dict()
    assert stored["passed"] is True and stored["thresholds"]["max_mean_kl"] == 0.05


# The gate on faults in what the ranks would serve ---------------------------------------------


@pytest.mark.parametrize("fault", tiny.SHIPPED_FAULTS, ids=lambda f: f.name)
@pytest.mark.parametrize("family", FAMILIES)
def test_faults_in_the_shipped_shards_are_stopped_by_the_logit_gate(family, fault):
    plan, shards = _shipped(family, 2)
    planted = fault.plant(shards, plan)
    assert planted is not None
    report = _verify(family, _update(family), planted, plan)
    assert not report.passed
    # The logit metrics alone reject it, by a wide margin (calibration: 3x or more on mean KL).
    assert report.usage["mean_kl"] > 3.0, report.metrics
    assert _logit_violations(report)
    assert "mean_kl" in report.reason
    # And the weight check names a tensor the fault touched.
    assert report.usage["max_weight_error"] > 1.0
    assert report.worst_tensor is not None and report.worst_tensor in plan.tensors


@pytest.mark.parametrize("fault", tiny.MEASURED_FAULTS, ids=lambda f: f.name)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_single_tensor_faults_are_stopped_by_the_weight_check(family, fault):
    """One tensor's scale wrong: on a 2-layer model some of these move the logits less than the
    FP8 noise does (Qwen3's q_norm / k_norm renormalize a query scaled x1000), so the weight check
    is what names them."""
    plan, shards = _shipped(family, 2)
    planted = fault.plant(shards, plan)
    assert planted is not None
    report = _verify(family, _update(family), planted, plan)
    assert not report.passed
    assert report.usage["max_weight_error"] > 5.0
    assert report.worst_tensor is not None
    assert report.worst_tensor.split(".")[2] == "0"  # layer 0, where every fault is planted
    assert f"max_weight_error {report.metrics['max_weight_error']:.4g}" in report.reason
    assert report.worst_tensor in report.reason


@pytest.mark.parametrize("family", FAMILIES)
def test_quantization_hostile_updates(family):
    """Outliers 1000x a tensor's peak in four blocks per linear weight: the shards are a faithful
    quantization (the weight check's bound holds for any input), yet the served model is far from
    bf16, through the activation groups the outlier channels dominate and the weights pushed
    below e4m3's normal range. The logit gate sees it; at 10x the peak Qwen3 still passes."""
    config = tiny.CONFIGS[family]
    hostile = synthetic.outlier_update(synthetic.base_state(config, 0), 1000.0)
    plan, shards = tiny.ship(config, hostile, 2)
    report = _verify(family, hostile, shards, plan)
    assert report.metrics["max_weight_error"] <= 2.0**-4
    assert not report.passed and _logit_violations(report)
    assert report.metrics["max_kl"] > 5.0


# Faults the shards carry before any logit is computed ----------------------------------------


def test_a_shard_missing_a_scale_is_rejected_by_name():
    plan, shards = _shipped("llama", 2)
    name = scale_name(plan.tensors["model.layers.1.mlp.up_proj.weight"])
    broken = [dict(s) for s in shards]
    del broken[1][name]
    report = _verify("llama", _update("llama"), broken, plan)
    assert not report.passed
    assert (
        report.reason == f"rank shards do not match the plan: rank 1 shard: missing tensors: {name}"
    )
    assert "mean_kl" not in report.metrics


def test_a_non_finite_scale_is_rejected_by_name():
    plan, shards = _shipped("llama", 2)
    name = scale_name(plan.tensors["model.layers.0.self_attn.q_proj.weight"])
    broken = [dict(s) for s in shards]
    broken[0][name] = broken[0][name].clone()
    broken[0][name][0, 0] = float("nan")
    report = _verify("llama", _update("llama"), broken, plan)
    assert not report.passed
    assert f"{name} holds NaN or Inf" in report.reason


def test_shards_for_another_tp_size_are_rejected():
    plan, _ = _shipped("qwen3", 2)
    _, one_rank = _shipped("qwen3", 1)
    report = _verify("qwen3", _update("qwen3"), one_rank, plan)
    assert not report.passed and "1 rank shards for a plan of tp_size 2" in report.reason


# The optional drift check ---------------------------------------------------------------------


def test_drift_is_off_by_default():
    plan, shards = _shipped("qwen3", 1)
    report = _verify("qwen3", _update("qwen3"), shards, plan, previous_state=_update("qwen3", 1))
    assert report.passed and "drift_mean_kl" not in report.metrics


def test_drift_check_passes_a_training_step_and_stops_a_blown_up_one():
    family = "qwen3"
    previous = synthetic.base_state(tiny.CONFIGS[family], 0)
    plan, shards = _shipped(family, 1)
    drift = DriftThresholds(max_mean_kl=0.05)
    step = _verify(family, _update(family), shards, plan, previous_state=previous, drift=drift)
    assert step.passed, step.reason
    assert 0.0 < step.metrics["drift_mean_kl"] < 0.005  # one step of 1e-3 std
    # A blown-up step: the new weights have nothing to do with the previous version's. The
    # quantization is still faithful, so only the drift check objects.
    other = synthetic.base_state(tiny.CONFIGS[family], 7)
    blown = _verify(family, _update(family), shards, plan, previous_state=other, drift=drift)
    assert not blown.passed
    assert blown.metrics["drift_mean_kl"] > 1.0
    assert blown.reason.startswith("the bf16 update drifts from the previous version")
    assert not _logit_violations(blown)
    # No previous version yet (the first update): nothing to compare with.
    first = _verify(family, _update(family), shards, plan, drift=drift)
    assert first.passed and "drift_mean_kl" not in first.metrics
