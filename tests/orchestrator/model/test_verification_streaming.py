"""How the Verifier runs: built once and reused, one decoder layer's weights at a time, the
caller's tensors used in place and never written, shards that are views of one flat buffer per
rank, and the FP8 GEMM chosen by a probe (tried here with stand-ins for torch._scaled_mm)."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from kernels.fp8 import BLOCK, FP8_DTYPE
from kernels.fp8_gemm import fp8_block_gemm_reference
from orchestrator.model import synthetic
from orchestrator.model.gemm import (
    BlockGemm,
    Gemm,
    ScaledMM,
    cublas_blockwise_takes,
    probe_scaled_mm,
)
from orchestrator.model.planner import ModelPlan
from orchestrator.model.probe import probe_batch
from orchestrator.model.served import ServedLinear
from orchestrator.model.verification import Thresholds, Verifier, verifier_for, verify
from tests.orchestrator import _tiny_models as tiny

CONFIG = tiny.CONFIGS["qwen3"]
BF16 = torch.bfloat16


@functools.cache
def _update() -> dict[str, torch.Tensor]:
    return synthetic.honest_update(synthetic.base_state(CONFIG, 0), 100)


@functools.cache
def _shipped(tp: int) -> tuple[ModelPlan, list[dict[str, torch.Tensor]]]:
    return tiny.ship(CONFIG, _update(), tp)


def _flat(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shard as views into one uint8 buffer, as the pipeline hands shards over."""
    sizes = {n: -(-t.numel() * t.element_size() // 16) * 16 for n, t in shard.items()}
    buffer = torch.empty(sum(sizes.values()), dtype=torch.uint8)
    out, offset = {}, 0
    for name, t in shard.items():
        n = t.numel() * t.element_size()
        piece = buffer[offset : offset + n]
        piece.copy_(t.contiguous().view(-1).view(torch.uint8))
        out[name] = piece.view(t.dtype).view(t.shape)
        offset += sizes[name]
    return out


def _materialized(model: torch.nn.Module) -> int:
    """How many decoder layers hold real (not meta) tensors or loaded FP8 weights now."""
    count = 0
    for layer in model.get_submodule("model.layers"):
        params = [p for p in layer.parameters() if not p.is_meta]
        served = [
            m
            for m in layer.modules()
            if isinstance(m, ServedLinear) and (m.weight is not None or m.row_pieces)
        ]
        count += bool(params or served)
    return count


def test_verify_builds_the_model_once_per_config_and_device():
    plan, shards = _shipped(1)
    verify(CONFIG, _update(), shards, plan, probe_batch(512), Thresholds())
    verifier = verifier_for(CONFIG, "cpu")
    reference = verifier.reference
    verify(CONFIG, _update(), shards, plan, probe_batch(512), Thresholds())
    assert verifier_for(dict(CONFIG), torch.device("cpu")) is verifier
    assert verifier.reference is reference
    assert verifier_for({**CONFIG, "rms_norm_eps": 1e-5}, "cpu") is not verifier


@pytest.mark.parametrize("tp", [1, 2])
def test_one_layer_at_a_time_in_place_and_nothing_written(tp):
    plan, shards = _shipped(tp)
    shards = [_flat(s) for s in shards]
    before = [{n: t.clone() for n, t in s.items()} for s in shards]
    update = _update()
    verifier = Verifier(CONFIG)
    seen: list[tuple[str, int, int]] = []
    in_place: list[bool] = []

    def watch(which: str, index: int, layer, _args) -> None:
        held = _materialized(verifier.reference) + _materialized(verifier.candidate)
        seen.append((which, index, held))
        if which == "reference":
            # The update is bf16 here: the layer's weights are the caller's tensors themselves.
            name = f"model.layers.{index}.self_attn.q_proj.weight"
            in_place.append(layer.self_attn.q_proj.weight.data_ptr() == update[name].data_ptr())
        elif tp == 1:
            # At TP 1 the served weight is a view into rank 0's buffer, not a copy.
            name = f"model.layers.{index}.mlp.down_proj.weight"
            got = layer.mlp.down_proj.weight
            in_place.append(got.data_ptr() == shards[0][name].data_ptr())

    for which, model in (("reference", verifier.reference), ("candidate", verifier.candidate)):
        for index, layer in enumerate(model.get_submodule("model.layers")):
            layer.register_forward_pre_hook(functools.partial(watch, which, index))
    report = verifier(update, shards, plan, probe_batch(512), Thresholds())
    assert report.passed, report.reason
    layers = CONFIG["num_hidden_layers"]
    assert [(w, i) for w, i, _ in seen] == [
        *(("reference", i) for i in range(layers)),
        *(("candidate", i) for i in range(layers)),
    ]
    assert all(count == 1 for _, _, count in seen), seen  # the running layer, nothing else
    assert in_place and all(in_place)
    assert _materialized(verifier.reference) == _materialized(verifier.candidate) == 0
    for rank, shard in enumerate(shards):
        for name, t in shard.items():
            assert torch.equal(t.view(torch.uint8), before[rank][name].view(torch.uint8)), name


def test_an_fp32_update_is_cast_one_layer_at_a_time_and_judged_as_its_bf16_cast():
    plan, shards = _shipped(2)
    bf16 = _update()
    fp32 = {n: t.float() for n, t in bf16.items()}
    a = Verifier(CONFIG)(bf16, shards, plan, probe_batch(512), Thresholds())
    b = Verifier(CONFIG)(fp32, shards, plan, probe_batch(512), Thresholds())
    assert a.metrics == b.metrics and a.worst_tensor == b.worst_tensor


# The FP8 GEMM: the probe, with stand-ins for torch._scaled_mm ----------------------------------


def _exact(a, b, scale_a, scale_b, *, out_dtype):
    """What _scaled_mm computes, for activation scales [T, K/128] (or [T, 1]) and weight scales
    [K/128, N/128] (or [1, N]), whatever their memory layout."""
    if scale_a.shape[1] == 1:
        x = a.float() * scale_a
    else:
        x = a.float() * scale_a.repeat_interleave(BLOCK, 1)
    if scale_b.shape[0] == 1:
        w = b.float() * scale_b
    else:
        w = b.float() * scale_b.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return (x @ w).to(out_dtype)


def _token_major_only(a, b, scale_a, scale_b, *, out_dtype):
    if scale_a.shape[1] > 1 and scale_a.stride(0) != 1:
        raise RuntimeError("scale_a must be outer-dim-major")
    return _exact(a, b, scale_a, scale_b, out_dtype=out_dtype)


def _transposed(a, b, scale_a, scale_b, *, out_dtype):
    # Reads the weight scales the wrong way round (a layout mistake that does not raise).
    if scale_b.shape[0] > 1:
        scale_b = scale_b.t().contiguous().view(scale_b.shape)
    return _exact(a, b, scale_a, scale_b, out_dtype=out_dtype)


def _unsupported(*_args, **_kw):
    raise RuntimeError("not supported on this device")


def test_the_probe_keeps_the_first_layout_that_computes_right():
    cpu = torch.device("cpu")
    chosen = probe_scaled_mm(cpu, _exact)
    assert (chosen.blockwise_layout, chosen.rowwise_ok) == ("row-major", True)
    chosen = probe_scaled_mm(cpu, _token_major_only)
    assert (chosen.blockwise_layout, chosen.rowwise_ok) == ("token-major", True)


def test_the_probe_falls_back_to_the_emulation_and_says_so(caplog):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="refitd.verification"):
        wrong = probe_scaled_mm(cpu, _transposed)
        none = probe_scaled_mm(cpu, _unsupported)
    assert wrong.blockwise_layout is None and wrong.rowwise_ok  # rowwise has no grid to misread
    assert none.blockwise_layout is None and not none.rowwise_ok
    assert none.name == "blockwise: emulated, rowwise: emulated"
    assert len([r for r in caplog.records if "emulates" in r.message]) == 2


def _block_gemm(xq, xs, wq, ws):
    """What kernels/fp8_gemm.py computes (its reference, rounded to bf16 as the kernel's out)."""
    return fp8_block_gemm_reference(xq, xs, wq, ws).to(BF16)


def _block_gemm_scales_flipped(xq, xs, wq, ws):
    # A product that reads each band of weight scales from the wrong band: it must not be kept.
    return _block_gemm(xq, xs, wq, ws.flip(0))


def _block_gemm_fails(*_args):
    raise RuntimeError("PTX does not compile for this device")


KERNEL = BlockGemm("kernel", _block_gemm)
ALIGNED = BlockGemm("aligned", _block_gemm, aligned_only=True)


def test_without_a_blockwise_scaled_mm_the_probe_keeps_the_products_that_compute_right(caplog):
    cpu = torch.device("cpu")
    flipped = BlockGemm("flipped", _block_gemm_scales_flipped)
    failing = BlockGemm("failing", _block_gemm_fails)
    with caplog.at_level(logging.WARNING, logger="refitd.verification"):
        kept = probe_scaled_mm(cpu, _transposed, [ALIGNED, flipped, failing, KERNEL])
        assert not [r for r in caplog.records if "emulates" in r.message]
        broken = probe_scaled_mm(cpu, _transposed, [flipped, failing])
    assert kept.blockwise_layout is None and kept.block_gemms == (ALIGNED, KERNEL)
    assert kept.name == "blockwise: aligned for aligned shapes, then kernel, rowwise: scaled_mm"
    assert broken.block_gemms == ()
    assert broken.name == "blockwise: emulated, rowwise: scaled_mm"
    assert any("flipped differs from the emulation" in r.message for r in caplog.records)
    assert any("PTX does not compile" in r.message for r in caplog.records)
    assert any("emulates" in r.message for r in caplog.records)
    # scaled_mm's own blockwise layout, where one computes right, goes first; the kernel takes
    # the shapes cuBLAS does not.
    both = probe_scaled_mm(cpu, _exact, [KERNEL])
    assert (both.blockwise_layout, both.block_gemms) == ("row-major", (KERNEL,))
    assert both.name == (
        "blockwise: scaled_mm (row-major) for aligned shapes, then kernel, rowwise: scaled_mm"
    )


def _garbage_unless_aligned(a, b, scale_a, scale_b, *, out_dtype):
    # torch 2.11's _scaled_mm on the H200: right for aligned shapes, silently wrong otherwise.
    got = _exact(a, b, scale_a, scale_b, out_dtype=out_dtype)
    return got if b.shape[0] % 512 == 0 else got * 0 + 1000


def test_scaled_mm_gets_only_the_shapes_cublas_takes_and_the_kernel_the_rest():
    gemm = ScaledMM("token-major", True, _garbage_unless_aligned, (KERNEL,))
    g = torch.Generator().manual_seed(2)
    for tokens, k, n in [(32, 512, 256), (32, 384, 256), (32, 512, 200), (24, 512, 256)]:
        xq = (torch.randn(tokens, k, generator=g) * 100).clamp(-448, 448).to(FP8_DTYPE)
        wq = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(FP8_DTYPE)
        xs = torch.rand(tokens, -(-k // BLOCK), generator=g)
        ws = torch.rand(-(-n // BLOCK), -(-k // BLOCK), generator=g)
        got, want = gemm.blockwise(xq, xs, wq, ws), Gemm().blockwise(xq, xs, wq, ws)
        assert (got.float() - want).abs().max() <= 2.0**-6 * want.abs().max(), (tokens, k, n)


def test_a_product_for_aligned_shapes_only_leaves_the_others_to_the_next_or_the_emulation():
    calls = []

    def counted(name, fn):
        def run(*args):
            calls.append(name)
            return fn(*args)

        return run

    gemm = ScaledMM(
        None,
        True,
        _exact,
        (BlockGemm("aligned", counted("aligned", _block_gemm), aligned_only=True),),
    )
    xq = torch.ones(32, 512, dtype=torch.float32).to(FP8_DTYPE)
    xs = torch.ones(32, 4)
    # Aligned; a tail of N; a tail of K; K of three blocks, not four; 8 tokens, not 16.
    for t, n, k in [(32, 256, 512), (32, 200, 512), (32, 256, 500), (32, 256, 384), (8, 256, 512)]:
        wq, ws = torch.ones(n, k).to(FP8_DTYPE), torch.ones(-(-n // BLOCK), -(-k // BLOCK))
        got = gemm.blockwise(xq[:t, :k], xs[:t, : ws.shape[1]], wq, ws)
        assert got.shape == (t, n)
    assert calls == ["aligned"]  # the others went to the emulation
    assert gemm.name == "blockwise: aligned for aligned shapes, else emulated, rowwise: scaled_mm"


@pytest.mark.parametrize("tp", [1, 2])
def test_a_verification_through_scaled_mm_scores_like_the_emulation(tp):
    """The GPU path's plumbing (scale layouts, rank pieces, bf16 outputs) run on the CPU with an
    exact stand-in for _scaled_mm: same verdict, metrics within bf16 rounding of the emulation's."""
    plan, shards = _shipped(tp)
    gemm = probe_scaled_mm(torch.device("cpu"), _token_major_only)
    scaled = Verifier(CONFIG, gemm=gemm)(_update(), shards, plan, probe_batch(512), Thresholds())
    emulated = Verifier(CONFIG, gemm=Gemm())(
        _update(), shards, plan, probe_batch(512), Thresholds()
    )
    assert scaled.gemm.startswith("blockwise: scaled_mm (token-major)")
    assert scaled.passed and emulated.passed
    assert scaled.metrics["mean_kl"] == pytest.approx(emulated.metrics["mean_kl"], rel=0.2)
    assert scaled.metrics["max_weight_error"] == emulated.metrics["max_weight_error"]


@pytest.mark.parametrize("tp", [1, 2])
def test_a_verification_through_the_blockwise_kernel_scores_like_the_emulation(tp):
    plan, shards = _shipped(tp)
    gemm = probe_scaled_mm(torch.device("cpu"), _unsupported, [KERNEL])
    kernel = Verifier(CONFIG, gemm=gemm)(_update(), shards, plan, probe_batch(512), Thresholds())
    emulated = Verifier(CONFIG, gemm=Gemm())(
        _update(), shards, plan, probe_batch(512), Thresholds()
    )
    assert kernel.gemm.startswith("blockwise: kernel,")
    assert kernel.passed and emulated.passed
    assert kernel.metrics["mean_kl"] == pytest.approx(emulated.metrics["mean_kl"], rel=0.2)


def test_a_broken_scaled_mm_layout_would_be_caught_by_the_gate():
    """Had the probe kept a layout that reads the weight scales transposed, the logit gate would
    reject honest shards: the probe is what keeps a GPU quirk from failing every update."""
    plan, shards = _shipped(1)
    gemm = ScaledMM("row-major", True, _transposed)
    report = Verifier(CONFIG, gemm=gemm)(_update(), shards, plan, probe_batch(512), Thresholds())
    assert not report.passed and "mean_kl" in report.reason
    assert FP8_DTYPE in {t.dtype for t in shards[0].values()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tp", [1, 2])
def test_on_the_gpu_an_honest_update_scores_as_on_the_cpu(tp):
    plan, shards = _shipped(tp)
    cuda = torch.device("cuda")
    update = {n: t.to(cuda) for n, t in _update().items()}
    on_gpu = [{n: t.to(cuda) for n, t in s.items()} for s in shards]
    gpu = Verifier(CONFIG, cuda)(update, on_gpu, plan, probe_batch(512), Thresholds())
    cpu = Verifier(CONFIG)(_update(), shards, plan, probe_batch(512), Thresholds())
    assert gpu.passed, (gpu.reason, gpu.gemm)
    assert gpu.metrics["max_weight_error"] == pytest.approx(cpu.metrics["max_weight_error"], 1e-4)
    assert gpu.metrics["mean_kl"] == pytest.approx(cpu.metrics["mean_kl"], rel=0.3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_blockwise_products_are_not_emulated_and_compute_right():
    from kernels.blockwise import quantize_blockwise
    from kernels.token_group import quantize_token_groups
    from orchestrator.model.gemm import select_gemm

    cuda = torch.device("cuda", torch.cuda.current_device())
    gemm = select_gemm(cuda)
    assert isinstance(gemm, ScaledMM)
    assert gemm.blockwise_layout or any(not g.aligned_only for g in gemm.block_gemms), gemm
    assert Verifier(CONFIG, "cuda").device == cuda  # "cuda" is indexed, as tensors' devices are
    g = torch.Generator().manual_seed(3)
    # Whole blocks, and tails of K and N (Qwen2.5-7B's TP-8 MLP shard).
    for tokens, k, n in [(512, 4096, 1024), (300, 2368, 3584), (64, 3584, 2368)]:
        xq, xs = quantize_token_groups(torch.randn(tokens, k, generator=g).cuda())
        wq, ws = quantize_blockwise((torch.randn(n, k, generator=g) * 0.02).cuda())
        got, want = gemm.blockwise(xq, xs, wq, ws), Gemm().blockwise(xq, xs, wq, ws)
        assert (got.float() - want).abs().max() <= 2.0**-6 * want.abs().max(), (tokens, k, n)


def test_cublas_takes_only_whole_blocks_in_16_byte_aligned_memory() -> None:
    # A weight cut out of a packed shard may start at any byte: cuBLAS is not given it.
    xq = torch.zeros(32, 512, dtype=FP8_DTYPE)
    packed = torch.zeros(256 * 512 + 16, dtype=torch.uint8)
    aligned = packed[: 256 * 512].view(FP8_DTYPE).view(256, 512)
    shifted = packed[1 : 1 + 256 * 512].view(FP8_DTYPE).view(256, 512)
    ws = torch.ones(2, 4)
    assert cublas_blockwise_takes(xq, aligned, ws)
    assert not cublas_blockwise_takes(xq, shifted, ws)
    assert not cublas_blockwise_takes(xq, aligned, torch.ones(2 * 4 + 1)[1:].view(2, 4))
    assert not cublas_blockwise_takes(xq[:31], aligned, ws)  # tokens not in 16s
    assert not cublas_blockwise_takes(xq[:, :384], aligned[:, :384].contiguous(), ws[:, :3])
