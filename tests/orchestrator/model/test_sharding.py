"""Per-rank shards against the kernels' reference quantizers: each rank holds exactly its slice of
the unsharded quantization (values and scales, bit for bit), unshard puts it back together, and
dequantize_state gives bf16 back under the original names."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.blockwise import quantize_blockwise_reference
from kernels.fp8 import BLOCK, FP8_DTYPE
from kernels.per_channel import quantize_per_channel_reference
from orchestrator.model.planner import ModelPlan, PlanError, Scheme, Split, plan_model, scale_name
from orchestrator.model.sharding import quantize_state, shard_state
from tests.orchestrator._shapes import (
    MODELS,
    QWEN2_5_0_5B,
    QWEN2_5_1_5B,
    head_dim,
    layer_shapes,
    model_shapes,
)
from tests.orchestrator._sharding import dequantize_state, quantize_and_shard, unshard

BF16 = torch.bfloat16
Tensors = dict[str, torch.Tensor]
# e4m3fn keeps 3 mantissa bits: a value in the normal range is rounded to within 2**-4 of itself
# (relative), so the noise energy is at most 2**-8 of the signal (24.1 dB); the bf16 rounding
# of the dequantized value adds up to 2**-8 relative more, (2**-4 + 2**-8)**2 -> 23.6 dB. Random
# normal weights land near 30 dB; a floor of 23.5 dB holds for any input that is not subnormal.
SNR_FLOOR_DB = 23.5


def _random_state(shapes: Mapping[str, tuple[int, ...]], seed: int) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=BF16) for name, shape in shapes.items()}


def _reference(state: Mapping[str, torch.Tensor], plan: ModelPlan) -> Tensors:
    """The unsharded quantization, tensor by tensor, with the kernels' plain-torch oracles."""
    out: Tensors = {}
    for t in plan.tensors.values():
        if t.scheme is Scheme.NONE:
            out[t.name] = state[t.name].to(BF16)
            continue
        quantize = {
            Scheme.BLOCKWISE: quantize_blockwise_reference,
            Scheme.PER_CHANNEL: quantize_per_channel_reference,
        }[t.scheme]
        out[t.name], out[scale_name(t)] = quantize(state[t.name])
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    assert torch.equal(_bits(actual), _bits(expected)), what


def _rank_rows(config: dict, leaf: str, tp: int, rank: int) -> list[tuple[int, int]]:
    """The rows of a column-parallel tensor that `rank` holds, as SGLang and vLLM load them."""
    d = head_dim(config)
    kv_heads = config["num_key_value_heads"]
    q, kv, inter = config["num_attention_heads"] * d, kv_heads * d, config["intermediate_size"]

    def even(size: int, offset: int = 0) -> list[tuple[int, int]]:
        n = size // tp
        return [(offset + rank * n, offset + (rank + 1) * n)]

    def kv_rows(offset: int) -> list[tuple[int, int]]:
        if kv_heads >= tp:
            return even(kv, offset)
        head = rank * kv_heads // tp  # tp // kv_heads consecutive ranks share one kv head
        return [(offset + head * d, offset + (head + 1) * d)]

    return {
        "q_proj": even(q),
        "k_proj": kv_rows(0),
        "v_proj": kv_rows(0),
        "qkv_proj": even(q) + kv_rows(q) + kv_rows(q + kv),
        "gate_proj": even(inter),
        "up_proj": even(inter),
        "gate_up_proj": even(inter) + even(inter, inter),
    }[leaf]


def _take(t: torch.Tensor, dim: int, ranges: list[tuple[int, int]], unit: int = 1) -> torch.Tensor:
    return torch.cat([t.narrow(dim, a // unit, (b - a) // unit) for a, b in ranges], dim)


def _check_rank_slices(
    config: dict, plan: ModelPlan, whole: Mapping[str, torch.Tensor], shards: list[Tensors]
) -> None:
    """Every rank holds its slice of the unsharded quantization, computed here independently."""
    tp = plan.tp_size
    for t in plan.tensors.values():
        leaf = t.name.split(".")[-2]
        for rank, shard in enumerate(shards):
            if t.split is Split.COLUMN:
                dim, ranges = 0, _rank_rows(config, leaf, tp, rank)
            elif t.split is Split.ROW:
                n = t.shape[1] // tp
                dim, ranges = 1, [(rank * n, (rank + 1) * n)]
            elif t.split is Split.VOCAB:
                chunk = -(-t.shape[0] // tp)
                vocab = t.shape[0]
                dim, ranges = 0, [(min(vocab, rank * chunk), min(vocab, (rank + 1) * chunk))]
            else:
                _assert_same(shard[t.name], whole[t.name], t.name)
                continue
            what = f"{t.name} rank {rank}"
            _assert_same(shard[t.name], _take(whole[t.name], dim, ranges), what)
            if t.scheme is Scheme.BLOCKWISE:
                scale = _take(whole[scale_name(t)], dim, ranges, BLOCK)
                _assert_same(shard[scale_name(t)], scale, what + " scale_inv")
            elif t.scheme is Scheme.PER_CHANNEL:
                # [out, 1]: cut with the rows of a column split, whole on every rank of a row split
                scale = whole[scale_name(t)]
                scale = _take(scale, 0, ranges) if dim == 0 else scale
                _assert_same(shard[scale_name(t)], scale, what + " scale")


def _fuse(config: dict, separate: Mapping[str, torch.Tensor]) -> Tensors:
    """A quantized layer in the fused qkv_proj / gate_up_proj form, from its separate form.

    Exact only when no 128-block straddles two parts, which holds for the real models here.
    """
    p = "model.layers.0"
    fused: Tensors = {}
    for name in layer_shapes(config, 0, fused=True):
        module, _, kind = name.rpartition(".")
        if module.endswith("qkv_proj"):
            parts = [f"{p}.self_attn.{x}_proj" for x in "qkv"]
        elif module.endswith("gate_up_proj"):
            parts = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
        else:
            fused[name] = separate[name]
            if name + "_scale_inv" in separate:
                fused[name + "_scale_inv"] = separate[name + "_scale_inv"]
            continue
        fused[name] = torch.cat([separate[f"{m}.{kind}"] for m in parts])
        if kind == "weight":
            fused[name + "_scale_inv"] = torch.cat(
                [separate[f"{m}.weight_scale_inv"] for m in parts]
            )
    return fused


@functools.lru_cache(maxsize=1)  # one model's layer (about 1.3 GB) at a time
def _real_layer(model: str) -> tuple[Tensors, Tensors]:
    """One random bf16 layer of a real model (separate form) and its blockwise quantization."""
    config = MODELS[model]
    state = _random_state(layer_shapes(config, 0), seed=len(model))
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    return state, _reference(state, plan_model(shapes, 1, config=config))


# Separate projections at every TP size; the fused form at TP 8, where its parts are cut finest
# (tiny real-shaped models cover it at other sizes). Model by model: one layer in memory at a time.
REAL_CASES = [
    (model, tp, fused)
    for model in MODELS
    for tp, fused in ((1, False), (2, False), (4, False), (8, False), (8, True))
    if (model, tp, fused) != ("qwen2.5-7b", 8, True)  # 28 heads over 8 ranks: refused
]


@pytest.mark.slow  # the first case of each model quantizes a whole real layer (a few seconds)
@pytest.mark.parametrize(("model", "tp", "fused"), REAL_CASES)
def test_rank_shards_of_real_layers_concatenate_to_the_unsharded_quantization(
    model: str, tp: int, fused: bool
) -> None:
    config = MODELS[model]
    state, whole = _real_layer(model)
    shapes = layer_shapes(config, 0, fused=fused)
    if model == "qwen2.5-7b" and tp == 8:
        # 28 heads cannot be split over 8 ranks (test_planner); its MLP alone can: 18944 / 8 is
        # 2368 rows per rank, off the 128 grid, so per channel.
        shapes = {n: s for n, s in shapes.items() if ".mlp." in n}
        plan = plan_model(shapes, tp, config=config)
        assert {t.scheme for t in plan.tensors.values()} == {Scheme.PER_CHANNEL}
        whole = _reference({n: state[n] for n in shapes}, plan)
    else:
        plan = plan_model(shapes, tp, config=config)
        assert plan.fallbacks() == []
        if fused:
            whole = _fuse(config, whole)
    shards = shard_state(whole, plan)
    assert len(shards) == tp
    _check_rank_slices(config, plan, whole, shards)
    # Concatenating the ranks' shards gives the whole back (no kv head is replicated in these
    # layers at TP <= 8; fused tensors interleave their parts, checked rank by rank above).
    for t in plan.tensors.values():
        if t.split is Split.REPLICATED or t.parts is not None:
            continue
        names = [t.name]
        if t.scheme is Scheme.BLOCKWISE or (t.scheme is Scheme.PER_CHANNEL and t.split_dim == 0):
            names.append(scale_name(t))
        for name in names:
            joined = torch.cat([shard[name] for shard in shards], t.split_dim or 0)
            _assert_same(joined, whole[name], name)


def _assert_same_state(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        _assert_same(actual[name], tensor, name)


SMALL_CASES = [
    (QWEN2_5_0_5B, 1, False),
    (QWEN2_5_0_5B, 2, False),  # q 448 and kv 64 rows per rank: attention per channel
    (QWEN2_5_0_5B, 2, True),
    (QWEN2_5_1_5B, 4, False),  # 2 kv heads over 4 ranks; MLP 2240 per rank: per channel
    (QWEN2_5_1_5B, 4, True),
]


@pytest.mark.parametrize(
    ("config", "tp", "fused"),
    SMALL_CASES,
    ids=[f"{c['hidden_size']}-tp{tp}-{'fused' if f else 'separate'}" for c, tp, f in SMALL_CASES],
)
def test_quantize_and_shard_then_unshard_gives_the_whole_quantization(
    config: dict, tp: int, fused: bool
) -> None:
    # Real layer shapes; a short vocabulary that does not divide by tp, and an untied lm_head.
    small = {**config, "vocab_size": 1003, "tie_word_embeddings": False}
    shapes = model_shapes(small, fused=fused, layers=1)
    state = _random_state(shapes, seed=tp)
    plan = plan_model(shapes, tp, config=small)
    shards = quantize_and_shard(state, plan)
    whole = _reference(state, plan)
    _check_rank_slices(small, plan, whole, shards)
    unsharded = unshard(shards, plan)
    assert list(unsharded) == list(whole)  # checkpoint order, each weight before its scale
    _assert_same_state(unsharded, whole)
    for rank, shard in enumerate(shards):
        assert {n: tuple(t.shape) for n, t in shard.items()} == plan.shipped_shapes(rank)
        for name, t in shard.items():
            assert t.device.type == "cpu" and t.is_contiguous(), name
            # owns exactly its bytes: torch.save or a pipe would not carry the whole tensor
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
            if name.endswith(("_scale_inv", "_scale")):
                assert t.dtype == torch.float32, name
            else:
                quantized = plan.tensors[name].scheme is not Scheme.NONE
                assert t.dtype == (FP8_DTYPE if quantized else BF16), name
        loaded = safetensors.torch.load(safetensors.torch.save(shard))
        _assert_same_state(loaded, shard)


def test_a_rank_shard_is_the_quantization_of_that_rank_s_weights() -> None:
    """Why blockwise needs shards and fused parts on the 128 grid: then cutting the whole-tensor
    quantization equals quantizing each rank's own slice, as an engine loading bf16 would."""
    config = QWEN2_5_0_5B  # TP 2: qkv and o per channel, gate_up and down blockwise
    shapes = layer_shapes(config, 0, fused=True)
    state = _random_state(shapes, seed=5)
    plan = plan_model(shapes, 2, config=config)
    shards = quantize_and_shard(state, plan)
    for t in plan.tensors.values():
        if t.scheme is Scheme.NONE or (t.scheme is Scheme.PER_CHANNEL and t.split is Split.ROW):
            continue  # a row-parallel per-channel scale spans every rank's columns, by design
        quantize = {
            Scheme.BLOCKWISE: quantize_blockwise_reference,
            Scheme.PER_CHANNEL: quantize_per_channel_reference,
        }[t.scheme]
        for rank, shard in enumerate(shards):
            dim = t.split_dim or 0
            own = _take(state[t.name], dim, list(t.ranges[rank]))
            q, scale = quantize(own)
            _assert_same(shard[t.name], q, f"{t.name} rank {rank}")
            _assert_same(shard[scale_name(t)], scale, f"{t.name} rank {rank} scale")
    assert {(t.scheme, t.split) for t in plan.tensors.values() if t.scheme is not Scheme.NONE} == {
        (Scheme.PER_CHANNEL, Split.COLUMN),
        (Scheme.PER_CHANNEL, Split.ROW),
        (Scheme.BLOCKWISE, Split.COLUMN),
        (Scheme.BLOCKWISE, Split.ROW),
    }


def test_dequantize_state_gives_bf16_back_under_the_original_names() -> None:
    config = {**QWEN2_5_0_5B, "vocab_size": 1003}
    shapes = model_shapes(config, fused=True, layers=1)
    state = _random_state(shapes, seed=7)
    state["model.layers.0.mlp.gate_up_proj.weight"][:128, :128] = 0  # an all-zero block
    plan = plan_model(shapes, 2, config=config)
    shards = quantize_and_shard(state, plan)
    restored = dequantize_state(unshard(shards, plan))
    assert list(restored) == list(state)
    for name, original in state.items():
        assert restored[name].dtype == BF16
        if plan.tensors[name].scheme is Scheme.NONE:
            _assert_same(restored[name], original, name)
            continue
        noise = (restored[name].float() - original.float()).pow(2).sum()
        snr_db = 10 * torch.log10(original.float().pow(2).sum() / noise).item()
        assert snr_db > SNR_FLOOR_DB, (name, snr_db)
        assert torch.isfinite(restored[name]).all()
    assert not restored["model.layers.0.mlp.gate_up_proj.weight"][:128, :128].any()
    # A rank shard dequantizes to that rank's slice of the whole.
    rank_1 = dequantize_state(shards[1])
    down = "model.layers.0.mlp.down_proj.weight"
    _assert_same(rank_1[down], restored[down][:, 2432:], down)
    assert set(rank_1) == set(state)


def test_fp32_and_fp16_inputs_are_cast_to_bf16_first() -> None:
    config = {**QWEN2_5_0_5B, "vocab_size": 64}
    shapes = model_shapes(config, layers=1)
    state = {n: t.float() * 3 for n, t in _random_state(shapes, seed=3).items()}
    plan = plan_model(shapes, 2, config=config)
    as_bf16 = quantize_state({n: t.to(BF16) for n, t in state.items()}, plan)
    _assert_same_state(quantize_state(state, plan), as_bf16)
    as_fp16 = {n: t.half() for n, t in state.items()}
    fp16_via_bf16 = quantize_state({n: t.to(BF16) for n, t in as_fp16.items()}, plan)
    _assert_same_state(quantize_state(as_fp16, plan), fp16_via_bf16)


@st.composite
def _tiny_models(draw: st.DrawFn) -> tuple[dict, int, bool]:
    tp = draw(st.sampled_from([1, 2, 4, 8]))
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))  # powers of two: one of tp, kv divides the other
    heads = max(tp, kv_heads) * draw(st.integers(1, 3))
    config = {
        "model_type": draw(st.sampled_from(["qwen2", "qwen3", "llama"])),
        "hidden_size": draw(st.sampled_from([64, 128, 200, 256])),
        "intermediate_size": tp * draw(st.sampled_from([16, 32, 48, 64, 128])),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": draw(st.sampled_from([16, 64, 128])),
        "num_hidden_layers": 1,
        "vocab_size": draw(st.integers(tp, 300)),
        "tie_word_embeddings": draw(st.booleans()),
    }
    return config, tp, draw(st.booleans())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=_tiny_models(), seed=st.integers(0, 2**31 - 1))
def test_any_splittable_model_round_trips(model: tuple[dict, int, bool], seed: int) -> None:
    config, tp, fused = model
    shapes = model_shapes(config, fused=fused)
    state = _random_state(shapes, seed)
    plan = plan_model(shapes, tp, config=config)
    shards = quantize_and_shard(state, plan)
    whole = _reference(state, plan)
    _check_rank_slices(config, plan, whole, shards)
    _assert_same_state(unshard(shards, plan), whole)


@pytest.fixture(scope="module")
def small() -> tuple[Tensors, ModelPlan, list[Tensors]]:
    config = {**QWEN2_5_1_5B, "vocab_size": 64, "intermediate_size": 1024}
    shapes = model_shapes(config, layers=1)
    state = _random_state(shapes, seed=11)
    plan = plan_model(shapes, 4, config=config)
    return state, plan, quantize_and_shard(state, plan)


def test_an_update_that_does_not_fit_the_plan_is_refused(small) -> None:
    state, plan, _ = small
    k = "model.layers.0.self_attn.k_proj.weight"
    missing = {n: t for n, t in state.items() if n != k}
    with pytest.raises(PlanError, match=f"missing tensors: {k}"):
        quantize_and_shard(missing, plan)
    with pytest.raises(PlanError, match=r"unexpected tensors: extra\.weight"):
        quantize_and_shard({**state, "extra.weight": torch.zeros(2, 2)}, plan)
    with pytest.raises(
        PlanError, match=rf"wrong shape: {k} has shape \[256, 1535\], expected \[256, 1536\]"
    ):
        quantize_and_shard({**state, k: state[k][:, 1:]}, plan)
    with pytest.raises(PlanError, match=r"wrong dtype: model\.norm\.weight is int32, expected"):
        quantize_and_shard(
            {**state, "model.norm.weight": torch.ones(1536, dtype=torch.int32)}, plan
        )


def test_unshard_refuses_shards_that_disagree_with_the_plan(small) -> None:
    _, plan, shards = small
    with pytest.raises(PlanError, match="expected 4 rank shards, got 3"):
        unshard(shards[:3], plan)
    k = "model.layers.0.self_attn.k_proj.weight"
    # Ranks 0 and 1 both hold kv head 0: a different copy on rank 1 is a sharding bug.
    tampered = [dict(s) for s in shards]
    tampered[1][k] = shards[1][k].view(torch.uint8).roll(1, 1).view(FP8_DTYPE)
    with pytest.raises(PlanError, match=f"{k}: ranks 0 and 1 hold different copies"):
        unshard(tampered, plan)
    tampered = [dict(s) for s in shards]
    tampered[3]["model.norm.weight"] = shards[3]["model.norm.weight"] * 2
    with pytest.raises(PlanError, match=r"model\.norm\.weight: ranks 0 and 3 hold different"):
        unshard(tampered, plan)
    down_scale = "model.layers.0.mlp.down_proj.weight_scale_inv"
    tampered = [dict(s) for s in shards]
    tampered[2][down_scale] = shards[2][down_scale][:, :1]
    with pytest.raises(PlanError, match=f"rank 2 shard .* wrong shape: {down_scale}"):
        unshard(tampered, plan)


def test_dequantize_state_refuses_fp8_without_its_scale(small) -> None:
    _, _, shards = small
    q = "model.layers.0.self_attn.q_proj.weight"
    lonely = {n: t for n, t in shards[0].items() if n != q + "_scale_inv"}
    with pytest.raises(PlanError, match=f"{q}: an fp8 tensor without"):
        dequantize_state(lonely)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_of_a_cuda_model_come_out_of_pinned_staging_bit_for_bit(tp: int) -> None:
    """On the GPU the shards reach host memory through one pinned staging buffer; each must
    still equal the CPU path's and own exactly its bytes."""
    config = {**QWEN2_5_1_5B, "vocab_size": 1003, "tie_word_embeddings": False}
    shapes = model_shapes(config, fused=False, layers=1)
    state = _random_state(shapes, seed=tp)
    plan = plan_model(shapes, tp, config=config)
    on_cpu = quantize_and_shard(state, plan)
    on_gpu = quantize_and_shard({n: t.cuda() for n, t in state.items()}, plan)
    for rank, (cpu_shard, gpu_shard) in enumerate(zip(on_cpu, on_gpu, strict=True)):
        assert list(gpu_shard) == list(cpu_shard), rank
        for name, t in gpu_shard.items():
            assert t.device.type == "cpu" and t.is_contiguous(), name
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
        _assert_same_state(gpu_shard, cpu_shard)
