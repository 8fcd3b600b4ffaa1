"""The one structure comparison (orchestrator/model/structure.py) and the places that call it."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8 import FP8_DTYPE
from orchestrator.errors import InvalidUpdate
from orchestrator.model.planner import PlanError, plan_model
from orchestrator.model.structure import UPDATE_DTYPES, compare, described, shipped_specs
from orchestrator.model.verification import check_structure
from orchestrator.service.sources import check_header
from tests.orchestrator._sharding import quantize_and_shard

EXPECTED = {
    "a.weight": ((4, 8), UPDATE_DTYPES),
    "b.weight": ((8,), torch.float32),
    "c.weight": ((2, 2), None),
}


def test_a_matching_set_has_no_mismatch():
    found = {"a.weight": ((4, 8), torch.float16), "b.weight": ((8,), torch.float32),
             "c.weight": ((2, 2), torch.int8)}  # fmt: skip
    mismatch = compare(found, EXPECTED)
    assert not mismatch and mismatch.problems() == [] and mismatch.describe() == ""


def test_every_kind_of_problem_is_named_in_one_message_in_a_fixed_order():
    found = {
        "z.weight": ((1,), torch.float32),
        "a.weight": ((8, 4), torch.bfloat16),
        "b.weight": ((8,), "I32"),
    }
    mismatch = compare(found, EXPECTED)
    assert mismatch.problems() == [
        "missing tensors: c.weight",
        "unexpected tensors: z.weight",
        "wrong shape: a.weight has shape [8, 4], expected [4, 8]",
        "wrong dtype: b.weight is I32, expected float32",
    ]
    assert mismatch.describe() == "; ".join(mismatch.problems())


def test_a_wrong_shape_is_not_also_a_wrong_dtype_and_alternatives_read_as_a_list():
    mismatch = compare({"a.weight": ((1,), torch.int64)}, {"a.weight": ((4, 8), UPDATE_DTYPES)})
    assert mismatch.wrong_dtype == ()
    mismatch = compare({"a.weight": ((4, 8), torch.int64)}, {"a.weight": ((4, 8), UPDATE_DTYPES)})
    assert mismatch.wrong_dtype == ("a.weight is int64, expected bfloat16, float16 or float32",)


def test_long_lists_are_cut_short():
    expected = {f"t{i}": ((1,), None) for i in range(12)}
    assert compare({}, expected).problems() == [
        "missing tensors: t0, t1, t2, t3, t4, t5, t6, t7 and 4 more"
    ]


def test_every_caller_words_one_fault_the_same_way():
    """The update checked as sent (verification), as a safetensors header (sources) and against
    the TP plan (sharding): the same wording for the same wrong shape."""
    state = {
        "model.norm.weight": torch.ones(4),
        "model.layers.0.mlp.up_proj.weight": torch.ones(8, 4),
    }
    expected = {name: (tuple(t.shape), UPDATE_DTYPES) for name, t in state.items()}
    bad = {**state, "model.norm.weight": torch.ones(5)}
    phrase = "wrong shape: model.norm.weight has shape [5], expected [4]"
    with pytest.raises(InvalidUpdate) as from_verification:
        check_structure(bad, expected)
    header = {name: ("F32", list(t.shape)) for name, t in bad.items()}
    with pytest.raises(InvalidUpdate) as from_sources:
        check_header(header, expected)
    plan = plan_model({n: t.shape for n, t in state.items()}, 1)
    with pytest.raises(PlanError) as from_sharding:
        quantize_and_shard(bad, plan)
    for caught in (from_verification, from_sources, from_sharding):
        assert phrase in caught.value.message


def test_shipped_specs_give_each_rank_fp8_data_fp32_scales_and_bf16_for_the_rest():
    shapes = {
        "model.layers.0.mlp.up_proj.weight": (256, 128),
        "model.layers.0.mlp.down_proj.weight": (128, 256),
        "model.norm.weight": (128,),
    }
    plan = plan_model(shapes, 2, config={"intermediate_size": 256})
    specs = shipped_specs(plan, 1)
    assert specs["model.layers.0.mlp.up_proj.weight"] == ((128, 128), FP8_DTYPE)
    assert specs["model.layers.0.mlp.up_proj.weight_scale_inv"] == ((1, 1), torch.float32)
    assert specs["model.norm.weight"] == ((128,), torch.bfloat16)
    state = {n: torch.randn(s).bfloat16() for n, s in shapes.items()}
    shards = quantize_and_shard(state, plan)
    for rank, shard in enumerate(shards):
        assert not compare(described(shard), shipped_specs(plan, rank)), rank
