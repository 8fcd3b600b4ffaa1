"""The TP planner on real model shapes (from their public config.json): splits, schemes, kv-head
replication, the per-channel fallback and its WARNING, and the errors for unsplittable models."""

from __future__ import annotations

import json
import logging

import pytest

from orchestrator.errors import InvalidUpdate
from orchestrator.model.planner import ModelPlan, PlanError, Scheme, Split, plan_model
from tests.orchestrator._shapes import (
    LLAMA_3_8B,
    MODELS,
    QWEN2_5_0_5B,
    QWEN2_5_1_5B,
    QWEN2_5_7B,
    QWEN3_8B,
    layer_shapes,
    model_shapes,
)

LINEAR = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj")
LINEAR += ("gate_up_proj", "down_proj")
COLUMN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj"}


def _leaf(name: str) -> str:
    return name.split(".")[-2]


def _mlp_only(config: dict) -> dict[str, tuple[int, ...]]:
    return {n: s for n, s in model_shapes(config).items() if ".mlp." in n}


def _rank_rows(plan: ModelPlan, name: str) -> list[tuple[tuple[int, int], ...]]:
    return list(plan.tensors[name].ranges)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("model", ["qwen3-8b", "llama-3-8b", "qwen2.5-7b"])
def test_real_models_split_and_quantize_blockwise(model: str, tp: int, fused: bool) -> None:
    config = MODELS[model]
    shapes = model_shapes(config, fused=fused)
    if model == "qwen2.5-7b" and tp == 8:
        # 28 heads over 8 ranks: SGLang and vLLM refuse this model at TP 8, and so do we.
        with pytest.raises(PlanError, match="num_attention_heads 28 is not divisible by tp_size 8"):
            plan_model(shapes, tp, config=config)
        return
    plan = plan_model(shapes, tp, config=config)
    assert list(plan.tensors) == list(shapes)
    for name, t in plan.tensors.items():
        leaf, kind = _leaf(name), name.rsplit(".", 1)[1]
        assert t.shape == shapes[name]
        if leaf in LINEAR and kind == "weight":
            assert (t.split, t.scheme, t.reason) == (
                Split.COLUMN if leaf in COLUMN else Split.ROW,
                Scheme.BLOCKWISE,
                None,
            ), name
        elif leaf in COLUMN:  # Qwen2's q/k/v biases travel with their rows
            assert (t.split, t.scheme, t.reason) == (Split.COLUMN, Scheme.NONE, "bias")
            weight = plan.tensors[name.replace(".bias", ".weight")]
            assert t.ranges == weight.ranges
        elif leaf in ("embed_tokens", "lm_head"):
            assert (t.split, t.scheme) == (Split.VOCAB, Scheme.NONE)
        else:
            assert leaf.endswith("norm"), name
            assert (t.split, t.scheme, t.reason) == (Split.REPLICATED, Scheme.NONE, "norm")
    assert plan.fallbacks() == []


def test_qwen3_8b_tp8_ranges_and_shipped_shapes() -> None:
    plan = plan_model(model_shapes(QWEN3_8B, layers=1), 8, config=QWEN3_8B)
    p = "model.layers.0"
    assert _rank_rows(plan, f"{p}.self_attn.q_proj.weight")[3] == ((1536, 2048),)
    assert _rank_rows(plan, f"{p}.self_attn.k_proj.weight")[3] == ((384, 512),)
    assert _rank_rows(plan, f"{p}.self_attn.o_proj.weight")[7] == ((3584, 4096),)
    assert _rank_rows(plan, f"{p}.mlp.down_proj.weight")[1] == ((1536, 3072),)
    assert _rank_rows(plan, "model.embed_tokens.weight")[1] == ((18992, 37984),)
    assert plan.tensors[f"{p}.self_attn.q_norm.weight"].split is Split.REPLICATED
    shipped = plan.shipped_shapes(5)
    assert shipped[f"{p}.self_attn.q_proj.weight"] == (512, 4096)
    assert shipped[f"{p}.self_attn.q_proj.weight_scale_inv"] == (4, 32)
    assert shipped[f"{p}.self_attn.o_proj.weight"] == (4096, 512)
    assert shipped[f"{p}.self_attn.o_proj.weight_scale_inv"] == (32, 4)
    assert shipped[f"{p}.mlp.gate_proj.weight_scale_inv"] == (12, 32)
    assert shipped["lm_head.weight"] == (18992, 4096)
    assert shipped[f"{p}.self_attn.k_norm.weight"] == (128,)
    assert f"{p}.self_attn.q_proj.weight_scale" not in shipped
    assert "model.embed_tokens.weight_scale_inv" not in shipped
    whole = plan.shipped_shapes()
    assert whole[f"{p}.mlp.down_proj.weight_scale_inv"] == (32, 96)
    assert set(whole) == set(shipped) == set(plan.shipped_shapes(0))


def test_fused_qkv_and_gate_up_split_part_by_part() -> None:
    plan = plan_model(model_shapes(QWEN3_8B, fused=True, layers=1), 8, config=QWEN3_8B)
    qkv = plan.tensors["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.parts == (4096, 1024, 1024)
    assert qkv.ranges[3] == ((1536, 2048), (4096 + 384, 4096 + 512), (5120 + 384, 5120 + 512))
    gate_up = plan.tensors["model.layers.0.mlp.gate_up_proj.weight"]
    assert gate_up.parts == (12288, 12288)
    assert gate_up.ranges[7] == ((10752, 12288), (12288 + 10752, 24576))
    assert plan.shipped_shapes(0)["model.layers.0.self_attn.qkv_proj.weight_scale_inv"] == (6, 32)
    assert plan.tensors["model.layers.0.mlp.down_proj.weight"].parts is None


def test_kv_heads_replicated_when_fewer_than_ranks() -> None:
    # Qwen2.5-1.5B at TP 4: 2 kv heads, each held by 2 consecutive ranks (as in SGLang and vLLM).
    plan = plan_model(model_shapes(QWEN2_5_1_5B, layers=1), 4, config=QWEN2_5_1_5B)
    for proj in ("k_proj.weight", "v_proj.weight", "k_proj.bias"):
        ranges = _rank_rows(plan, f"model.layers.0.self_attn.{proj}")
        assert ranges == [((0, 128),), ((0, 128),), ((128, 256),), ((128, 256),)]
    assert plan.tensors["model.layers.0.self_attn.k_proj.weight"].scheme is Scheme.BLOCKWISE
    assert _rank_rows(plan, "model.layers.0.self_attn.q_proj.weight")[2] == ((768, 1152),)
    fused = plan_model(model_shapes(LLAMA_3_8B, fused=True, layers=1), 16, config=LLAMA_3_8B)
    qkv = fused.tensors["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.ranges[5] == ((1280, 1536), (4096 + 256, 4096 + 384), (5120 + 256, 5120 + 384))
    assert qkv.ranges[4][1:] == qkv.ranges[5][1:]
    assert qkv.scheme is Scheme.BLOCKWISE


def test_per_channel_fallback_on_qwen2_5_1_5b_mlp_at_tp4(caplog: pytest.LogCaptureFixture) -> None:
    shapes = model_shapes(QWEN2_5_1_5B)
    with caplog.at_level(logging.WARNING, logger="refitd.planner"):
        plan = plan_model(shapes, 4, config=QWEN2_5_1_5B)
    fallbacks = {t.name for t in plan.fallbacks()}
    assert fallbacks == {n for n in shapes if _leaf(n) in ("gate_proj", "up_proj", "down_proj")}
    gate = plan.tensors["model.layers.3.mlp.gate_proj.weight"]
    assert gate.reason == "rows per TP shard 2240 (8960/4) not a multiple of 128"
    down = plan.tensors["model.layers.3.mlp.down_proj.weight"]
    assert down.reason == "columns per TP shard 2240 (8960/4) not a multiple of 128"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert plan.tensors[f"model.layers.3.self_attn.{proj}.weight"].scheme is Scheme.BLOCKWISE
    records = [r for r in caplog.records if r.name == "refitd.planner"]
    assert all(r.levelno == logging.WARNING for r in records)
    assert len(records) == len(fallbacks) == 3 * 28
    message = next(r.getMessage() for r in records if "layers.3.mlp.down_proj" in r.getMessage())
    assert message == (
        "per-channel fallback for model.layers.3.mlp.down_proj.weight shape [1536, 8960] "
        "at tp_size 4: columns per TP shard 2240 (8960/4) not a multiple of 128"
    )
    assert {r.getMessage().split()[3] for r in records} == fallbacks  # one line per tensor
    shipped = plan.shipped_shapes(2)
    assert shipped["model.layers.3.mlp.gate_proj.weight_scale"] == (2240, 1)
    assert shipped["model.layers.3.mlp.down_proj.weight_scale"] == (1536, 1)
    assert "model.layers.3.mlp.down_proj.weight_scale_inv" not in shipped


def test_per_channel_fallback_of_fused_parts_names_each_part(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Qwen2.5-0.5B at TP 2: 7 heads of 64 per rank (448 rows) and one kv head of 64 rows.
    shapes = layer_shapes(QWEN2_5_0_5B, 0, fused=True)
    with caplog.at_level(logging.WARNING, logger="refitd.planner"):
        plan = plan_model(shapes, 2, config=QWEN2_5_0_5B)
    qkv = plan.tensors["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.scheme is Scheme.PER_CHANNEL
    assert qkv.reason == (
        "part 'q' per TP shard 448 (896/2) not a multiple of 128; "
        "part 'k' per TP shard 64 (128/2) not a multiple of 128; "
        "part 'v' per TP shard 64 (128/2) not a multiple of 128"
    )
    assert plan.tensors["model.layers.0.mlp.gate_up_proj.weight"].scheme is Scheme.BLOCKWISE
    assert [r.getMessage().split()[3] for r in caplog.records] == [
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    ]
    # At TP 1 the same tensors are on the grid: no fallback, no warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="refitd.planner"):
        assert plan_model(shapes, 1, config=QWEN2_5_0_5B).fallbacks() == []
    assert caplog.records == []


def test_qwen2_5_7b_mlp_at_tp8_falls_back_to_per_channel(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="refitd.planner"):
        plan = plan_model(_mlp_only(QWEN2_5_7B), 8, config=QWEN2_5_7B)
    assert len(plan.fallbacks()) == len(plan.tensors) == 3 * 28 == len(caplog.records)
    up = plan.tensors["model.layers.27.mlp.up_proj.weight"]
    assert up.reason == "rows per TP shard 2368 (18944/8) not a multiple of 128"
    assert "shape [18944, 3584] at tp_size 8" in caplog.records[-2].getMessage()


def test_no_warning_when_everything_is_blockwise(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="refitd.planner"):
        plan_model(model_shapes(QWEN3_8B, fused=True), 8, config=QWEN3_8B)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_awkward_shapes_fall_back_even_at_tp1() -> None:
    shapes = {"a.mlp.gate_proj.weight": (7, 130), "a.mlp.down_proj.weight": (128, 1)}
    plan = plan_model(shapes, 1)
    gate, down = plan.tensors.values()
    assert gate.scheme is down.scheme is Scheme.PER_CHANNEL
    assert gate.reason == "rows 7 not a multiple of 128; columns 130 not a multiple of 128"
    assert down.reason == "columns 1 not a multiple of 128"
    assert plan.shipped_shapes(0)["a.mlp.gate_proj.weight_scale"] == (7, 1)


def test_report_is_json_and_lists_every_tensor_with_reasons() -> None:
    plan = plan_model(model_shapes(QWEN2_5_1_5B, layers=2), 4, config=QWEN2_5_1_5B)
    report = json.loads(json.dumps(plan.report()))
    assert [e["name"] for e in report] == list(plan.tensors)
    by_name = {e["name"]: e for e in report}
    assert by_name["model.layers.1.mlp.up_proj.weight"] == {
        "name": "model.layers.1.mlp.up_proj.weight",
        "shape": [8960, 1536],
        "split": "column",
        "scheme": "per_channel",
        "reason": "rows per TP shard 2240 (8960/4) not a multiple of 128",
    }
    assert by_name["model.layers.0.self_attn.k_proj.bias"]["reason"] == "bias"
    assert by_name["model.embed_tokens.weight"]["reason"] == "embedding"
    assert by_name["model.norm.weight"]["split"] == "replicated"
    assert by_name["model.layers.1.self_attn.o_proj.weight"]["scheme"] == "blockwise"
    assert "lm_head.weight" not in by_name  # tied to the embedding


def test_ignore_patterns_match_names_and_module_prefixes() -> None:
    shapes = model_shapes(LLAMA_3_8B, layers=2)
    plan = plan_model(shapes, 2, config=LLAMA_3_8B, ignore=["*.mlp.down_proj", "model.layers.0"])
    down = plan.tensors["model.layers.1.mlp.down_proj.weight"]
    assert (down.split, down.scheme) == (Split.ROW, Scheme.NONE)
    assert down.reason == "ignored by pattern '*.mlp.down_proj'"
    q0 = plan.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert (q0.split, q0.scheme, q0.reason) == (
        Split.COLUMN,
        Scheme.NONE,
        "ignored by pattern 'model.layers.0'",
    )
    assert q0.ranges[1] == ((2048, 4096),)  # still split: only the quantization is skipped
    assert plan.tensors["model.layers.1.self_attn.q_proj.weight"].scheme is Scheme.BLOCKWISE
    exact = plan_model(shapes, 1, config=LLAMA_3_8B, ignore=["model.layers.1.mlp.up_proj.weight"])
    assert [t.name for t in exact.tensors.values() if t.reason and "ignored" in t.reason] == [
        "model.layers.1.mlp.up_proj.weight"
    ]


def test_other_tensors_are_replicated_bf16() -> None:
    shapes = {
        "model.rotary_emb.inv_freq": (64,),
        "model.layers.0.self_attn.o_proj.bias": (4096,),
        "visual.merger.mlp.0.weight": (4096, 4096),
    }
    plan = plan_model(shapes, 4, config=LLAMA_3_8B)
    assert [(t.split, t.scheme) for t in plan.tensors.values()] == [
        (Split.REPLICATED, Scheme.NONE)
    ] * 3
    assert plan.tensors["model.layers.0.self_attn.o_proj.bias"].reason == "bias"
    assert plan.shipped_shapes(3) == {name: tuple(s) for name, s in shapes.items()}


def test_uneven_vocab_is_split_in_ceil_chunks() -> None:
    plan = plan_model({"lm_head.weight": (32001, 4096)}, 4)
    assert plan.tensors["lm_head.weight"].ranges == (
        ((0, 8001),),
        ((8001, 16002),),
        ((16002, 24003),),
        ((24003, 32001),),
    )
    assert plan.shipped_shapes(3)["lm_head.weight"] == (7998, 4096)


@pytest.mark.parametrize(
    ("config", "shapes", "tp", "message"),
    [
        (LLAMA_3_8B, layer_shapes(LLAMA_3_8B, 0), 3, "num_attention_heads 32 is not divisible"),
        (QWEN2_5_1_5B, layer_shapes(QWEN2_5_1_5B, 0), 3, "tp_size 3 is not a multiple of num_key"),
        (LLAMA_3_8B, layer_shapes(LLAMA_3_8B, 0), 64, "num_attention_heads 32 is not divisible"),
        (QWEN3_8B, _mlp_only(QWEN3_8B), 5, "rows 12288 is not divisible by tp_size 5"),
        (None, {"x.down_proj.weight": (128, 100)}, 3, "columns 100 is not divisible by tp_size 3"),
        (None, layer_shapes(QWEN3_8B, 0), 2, "model config .* is needed to split attention"),
        (None, layer_shapes(QWEN3_8B, 0, fused=True), 1, "model config .* is needed"),
        (QWEN3_8B, {"l.self_attn.q_proj.weight": (4000, 4096)}, 1, "4000 rows, but the config"),
        (QWEN3_8B, {"l.mlp.gate_up_proj.weight": (24576, 4096)}, 2, None),
        (QWEN3_8B, {"l.mlp.gate_up_proj.weight": (24000, 4096)}, 2, "24000 rows, but the config"),
        (None, {"lm_head.weight": (3, 4096)}, 4, "3 vocabulary rows cannot be split over 4"),
        (None, {"l.o_proj.weight": (4096,)}, 2, "a linear weight must be 2-D"),
        (None, {}, 0, "tp_size must be at least 1"),
    ],
)
def test_unsplittable_models_raise_a_clear_error(
    config: dict | None, shapes: dict, tp: int, message: str | None
) -> None:
    if message is None:
        assert plan_model(shapes, tp, config=config).tensors  # the control case plans fine
        return
    with pytest.raises(PlanError, match=message) as info:
        plan_model(shapes, tp, config=config)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, InvalidUpdate)


def test_attention_without_config_at_tp1_and_gate_up_without_config() -> None:
    plan = plan_model(layer_shapes(QWEN3_8B, 0), 1)
    assert all(t.scheme is Scheme.BLOCKWISE for t in plan.tensors.values() if t.ranges)
    gate_up = plan_model({"l.mlp.gate_up_proj.weight": (640, 256)}, 2).tensors
    assert gate_up["l.mlp.gate_up_proj.weight"].parts == (320, 320)
    assert gate_up["l.mlp.gate_up_proj.weight"].ranges[1] == ((160, 320), (480, 640))
    assert gate_up["l.mlp.gate_up_proj.weight"].scheme is Scheme.PER_CHANNEL


def test_shipped_shapes_rejects_a_rank_out_of_range() -> None:
    plan = plan_model(_mlp_only(QWEN3_8B), 2, config=QWEN3_8B)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        plan.shipped_shapes(2)
