"""Calibration of the gate on models the tests make themselves: every honest update passes, at
TP 1, 2 and 4, with and without per-channel fallbacks, and every planted fault fails.

Families (tests/orchestrator/model/_calibration.py): a tiny byte-level model trained here on
standard-library sources, random-init models at std 0.02 to 0.1 (issue 11's shape and an aligned
one), and the trained-looking synthetic Llama / Qwen2 / Qwen3. The measured table:
docs/verification-notes.md (`bench/verify.py --table --write-notes`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from orchestrator.model.hf_model import hf_config
from orchestrator.model.planner import ModelPlan, Scheme
from orchestrator.model.probe import probe_batch
from orchestrator.model.verification import Thresholds, VerificationReport, verify
from tests.orchestrator import _tiny_models as tiny
from tests.orchestrator.model import _calibration as cal

LOGIT_METRICS = ("mean_kl", "max_kl", "top1_near_agreement", "max_abs_logit_diff")
NAMES = [family.name for family in cal.families()]
FAULTS = (*tiny.SHIPPED_FAULTS, *tiny.MEASURED_FAULTS)


@pytest.fixture(scope="session")
def families(request: pytest.FixtureRequest, tmp_path_factory) -> dict[str, cal.Family]:
    # The trained model is cached under pytest's cache dir (git-ignored), so it trains once.
    cache = getattr(request.config, "cache", None)
    where = Path(cache.mkdir("refitd-verification")) if cache else tmp_path_factory.mktemp("c")
    return {family.name: family for family in cal.families(where)}


def _run(family: cal.Family, plan: ModelPlan, shards, seed: int = 0) -> VerificationReport:
    return verify(family.config, family.update(seed), shards, plan, family.probe(), Thresholds())


@pytest.mark.parametrize("tp", cal.TP_SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_an_honest_update_passes_with_margin(families, name, tp):
    family = families[name]
    plan, shards = cal.shipped(family, tp)
    report = _run(family, plan, shards)
    assert report.passed, report.reason
    # Calibration: honest updates use at most 0.6 of a logit limit (random std 0.1, mean KL).
    logit = {k: v for k, v in report.usage.items() if k in LOGIT_METRICS}
    assert max(logit.values()) < 0.7, report.metrics
    assert report.metrics["top1_near_agreement"] >= 0.99


def test_every_family_is_run_with_and_without_per_channel_fallbacks(families):
    fallbacks = {
        (name, tp): len(cal.shipped(families[name], tp)[0].fallbacks())
        for name in NAMES
        for tp in cal.TP_SIZES
    }
    assert fallbacks[("random 0.05, aligned", 1)] == 0
    assert fallbacks[("random 0.05", 1)] > 0  # issue 11's MLP: intermediate 320
    assert fallbacks[("qwen3 (trained-looking)", 4)] == 0
    assert all(fallbacks[(name, 4)] > 0 for name in NAMES if "qwen3" not in name)


def test_the_update_of_issue_11_passes(families):
    """Issue 11: random N(0, 0.05) weights, intermediate 320 (per-channel MLP at TP 2), update =
    weights + N(0, 0.002), default probe. Rounding flips the near-tied top tokens at about a fifth
    of the positions, which the old exact-argmax limit (>= 0.8) rejected; the flips are between
    tokens the reference itself scores within a fraction of a nat."""
    config = cal.ISSUE_11
    weights = cal.random_init(config, 0.05, seed=0)
    update = cal.noisy(weights, seed=1)
    plan, shards = tiny.ship(config, update, 2)
    assert plan.tensors["model.layers.0.mlp.down_proj.weight"].scheme is Scheme.PER_CHANNEL
    report = verify(config, update, shards, plan, probe_batch(512), Thresholds())
    assert report.metrics["top1_agreement"] < 0.85  # near-ties flipped: what used to fail
    assert report.metrics["max_top1_regret"] < 0.6
    assert report.metrics["top1_near_agreement"] == 1.0
    assert report.passed, report.reason


# TP 2 on every family; TP 4 (kv heads replicated over ranks, more fallbacks) on one of each kind.
FAULT_CASES = [(name, 2) for name in NAMES] + [
    (name, 4) for name in ("trained (text probe)", "random 0.05", "qwen2 (trained-looking)")
]


@pytest.mark.parametrize(("name", "tp"), FAULT_CASES)
def test_every_planted_fault_fails(families, name, tp):
    family = families[name]
    plan, shards = cal.shipped(family, tp)
    passed, weakly_seen, planted = [], [], 0
    for fault in FAULTS:
        try:
            faulty = fault.plant(shards, plan)
        except RuntimeError:
            # A row-parallel scale grid with fewer block rows than ranks (the trained model's
            # 128-row o_proj) cannot be cut on the wrong dim in equal parts: not this plan's bug.
            faulty = None
        if faulty is None:
            continue
        planted += 1
        report = _run(family, plan, faulty)
        if report.passed:
            passed.append(fault.name)
        # Every planted fault changes shipped bits, and the weight check sees each one at least
        # twice over its limit (measured: 2.2x and up), whatever the logits do.
        if not report.usage.get("max_weight_error", 0.0) > 2.0:
            weakly_seen.append((fault.name, report.usage))
    assert planted >= 8
    assert passed == []
    assert weakly_seen == []


def test_the_trained_model_learned_its_text(families):
    """The trained family is trained: on held-out text its loss is far below a uniform guess
    over bytes (ln 256 = 5.5 nats), so its logits are confident where text is predictable."""
    state = families["trained (text probe)"].update(0)
    model = AutoModelForCausalLM.from_config(hf_config(cal.TRAINED))
    model.load_state_dict({n: t.float() for n, t in state.items()}, strict=False)
    model.eval()
    probe = cal.text_probe()
    with torch.no_grad():
        loss = float(model(input_ids=probe, labels=probe).loss)
    assert loss < 3.0
