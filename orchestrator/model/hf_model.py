"""A Hugging Face causal LM from its config.json alone, served in bf16 or as the ranks serve FP8.

No weights are downloaded or initialized: the model is built on the meta device and its
parameters are the update's tensors themselves (`load_state_dict(assign=True)`), so the bf16
reference costs no copy beyond a dtype cast. The candidate swaps each quantized Linear for one that
computes what SGLang's FP8 linear layers compute: FP8 weights with their scales, and activations
quantized to FP8 per token per 128-channel group at run time (per token, over a rank's slice, for
per-channel weights). On the CPU both quantizations are emulated by quantize-dequantize in fp32,
which is what a blockwise FP8 GEMM with fp32 accumulation computes.

Torch and transformers only.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from kernels.blockwise import dequantize_blockwise
from kernels.fp8 import BLOCK, FP8_DTYPE, FP8_MAX
from kernels.per_channel import dequantize_per_channel
from orchestrator.errors import ConfigError
from orchestrator.model.planner import ModelPlan, Scheme, Split, TensorPlan, scale_name

BF16 = torch.bfloat16

# SGLang's per_token_group_quant_fp8 floors a group's absmax here, so an all-zero group of
# activations quantizes to zeros with a finite scale.
ACTIVATION_EPS = 1e-10

# config.json keys that describe the file, not the model.
_FILE_KEYS = ("architectures", "transformers_version", "_name_or_path", "auto_map")


def hf_config(config: Mapping[str, Any]) -> PretrainedConfig:
    """The transformers config object of a config.json dict; ConfigError if it names no model."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError("model config has no 'model_type' (is it a Hugging Face config.json?)")
    values = {k: v for k, v in config.items() if k != "model_type" and k not in _FILE_KEYS}
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot build a {model_type!r} config: {exc}") from None


def build_model(config: Mapping[str, Any]) -> PreTrainedModel:
    """The causal LM of `config` on the meta device, in bf16 eval mode, with no weights yet."""
    cfg = hf_config(config)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(cfg)
        except ValueError as exc:
            raise ConfigError(f"transformers cannot build a causal LM from it: {exc}") from None
    # On meta, a dtype change costs nothing; done here rather than through from_config's dtype
    # keyword, whose name differs between transformers 4 and 5.
    model.to(BF16)
    model.eval()
    model.requires_grad_(False)
    # Tied parameters are one object under two names right after construction; loading with
    # assign=True replaces the source, so remember which names to point back at it.
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied[name] = seen[id(param)]
        else:
            seen[id(param)] = name
    _TIED[model] = tied
    return model


# model -> {tied parameter name: the name of the parameter it is}, e.g. lm_head -> embed_tokens.
_TIED: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()


def tied_names(model: PreTrainedModel) -> set[str]:
    """Parameters that are another parameter (lm_head tied to the embedding); never sent."""
    return set(_TIED.get(model, {}))


def _retie(model: PreTrainedModel) -> None:
    for target, source in _TIED.get(model, {}).items():
        parent, _, attr = target.rpartition(".")
        setattr(model.get_submodule(parent), attr, model.get_parameter(source))


def expected_shapes(model: PreTrainedModel) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an update of this model must carry, in checkpoint order."""
    tied = tied_names(model)
    return {
        name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if name not in tied
    }


def load_weights(
    model: PreTrainedModel, state: Mapping[str, torch.Tensor], device: torch.device
) -> None:
    """Make `state` the model's weights, without copying what is already bf16 on `device`.

    The caller's tensors are never written to: parameters are replaced, not filled.
    """
    weights = {name: t.to(device=device, dtype=BF16) for name, t in state.items()}
    with torch.no_grad():
        result = model.load_state_dict(weights, strict=False, assign=True)
    tied = tied_names(model)
    missing = [name for name in result.missing_keys if name not in tied]
    # Callers check the structure first, so this is an internal invariant.
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    _retie(model)
    _materialize_buffers(model, device)
    model.requires_grad_(False)


def _materialize_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Rebuild modules whose buffers are still on meta (rotary inv_freq) on `device`.

    Those buffers are not in a checkpoint; they are computed from the config at construction.
    """
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        module_config = getattr(module, "config", None)
        if module_config is None:
            raise ConfigError(
                f"cannot rebuild {name} ({type(module).__name__}) off the meta device"
            )
        with torch.device(device):
            rebuilt = type(module)(module_config)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, rebuilt)
    stray = [name for name, t in model.named_parameters() if t.is_meta]
    stray += [name for name, t in model.named_buffers() if t.is_meta]
    assert not stray, f"tensors left on the meta device: {stray}"


def quantize_activations(x: torch.Tensor, group_size: int = BLOCK) -> torch.Tensor:
    """Quantize-dequantize `x` to FP8 per token per `group_size` channels, as served; fp32 out.

    Each run of `group_size` consecutive channels of each token gets one scale absmax / FP8_MAX
    (SGLang's per_token_group_quant_fp8); a last, shorter group gets its own scale.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    channels = x.shape[-1]
    xf = x.float()
    pad = (-channels) % group_size
    if pad:
        xf = F.pad(xf, (0, pad))
    groups = xf.unflatten(-1, (-1, group_size))
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(ACTIVATION_EPS) / FP8_MAX
    q = (groups / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    out = (q.float() * scale).flatten(-2)
    return out[..., :channels] if pad else out


class Fp8Linear(nn.Module):
    """A Linear as a TP deployment serves it in FP8, from the unsharded weight and scale.

    The weight is dequantized in fp32 at each call, so only the fp8 copy stays resident. A
    row-parallel layer sums its ranks' bf16 partial outputs, as the all-reduce does.
    """

    weight: torch.Tensor  # fp8 [out, in]
    scale: torch.Tensor  # fp32 [out/128, in/128] (blockwise) or [out, 1] (per channel)
    bias: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        scheme: Scheme,
        bias: torch.Tensor | None,
        rank_columns: Sequence[Sequence[tuple[int, int]]] | None,
    ) -> None:
        super().__init__()
        if scheme not in (Scheme.BLOCKWISE, Scheme.PER_CHANNEL):
            raise ValueError(f"Fp8Linear serves quantized weights only, got scheme {scheme}")
        self.out_features, self.in_features = weight.shape
        self.scheme = scheme
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        # One entry per rank: the input columns it holds. None: every rank sees every column.
        self.rank_columns = [list(r) for r in rank_columns] if rank_columns else None

    def dequantized_weight(self) -> torch.Tensor:
        if self.scheme is Scheme.BLOCKWISE:
            return dequantize_blockwise(self.weight, self.scale, dtype=torch.float32)
        return dequantize_per_channel(self.weight, self.scale, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        if self.rank_columns is None:
            out = self._partial(x, w)
        else:
            out = torch.zeros(*x.shape[:-1], self.out_features, device=x.device)
            for ranges in self.rank_columns:
                x_rank = torch.cat([x[..., a:b] for a, b in ranges], dim=-1)
                w_rank = torch.cat([w[:, a:b] for a, b in ranges], dim=1)
                out += self._partial(x_rank, w_rank).to(BF16).float()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)

    def _partial(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Blockwise: groups of 128 channels (aligned with the weight's blocks, and with rank
        # slices, which the planner keeps whole blocks). Per-channel weights are served with one
        # activation scale per token over what the rank holds (a rowwise FP8 GEMM).
        group = BLOCK if self.scheme is Scheme.BLOCKWISE else x.shape[-1]
        return quantize_activations(x, group) @ w.t()

    def extra_repr(self) -> str:
        ranks = len(self.rank_columns) if self.rank_columns else 1
        return f"in={self.in_features}, out={self.out_features}, {self.scheme}, ranks={ranks}"


def install_fp8(
    model: PreTrainedModel,
    quantized: Mapping[str, torch.Tensor],
    plan: ModelPlan,
    device: torch.device,
) -> None:
    """Serve the model from the unsharded shipped tensors, as the ranks would.

    Every quantized weight becomes an Fp8Linear; every other tensor (embeddings, norms, lm_head,
    biases, unquantized linears) is the shipped bf16 tensor. The caller has checked `quantized`
    against the plan.
    """
    plain: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for tensor in plan.tensors.values():
        if tensor.scheme is Scheme.NONE:
            continue
        consumed.update((tensor.name, scale_name(tensor)))
        module_name = tensor.name.removesuffix(".weight")
        linear = model.get_submodule(module_name)
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{tensor.name} is quantized but {module_name} is not a Linear")
        bias_name = module_name + ".bias"
        bias = quantized.get(bias_name)
        consumed.add(bias_name)
        replacement = Fp8Linear(
            quantized[tensor.name].to(device),
            quantized[scale_name(tensor)].to(device),
            tensor.scheme,
            None if bias is None else bias.to(device=device, dtype=BF16),
            _rank_columns(tensor, plan.tp_size),
        )
        parent, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent), attr, replacement)
    for name, t in quantized.items():
        if name in consumed:
            continue
        plain[name] = t.to(device=device, dtype=BF16)
    with torch.no_grad():
        result = model.load_state_dict(plain, strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys
    _retie(model)
    model.requires_grad_(False)


def _rank_columns(tensor: TensorPlan, tp_size: int) -> list[list[tuple[int, int]]] | None:
    if tensor.split is not Split.ROW or tp_size == 1:
        return None
    return [list(ranges) for ranges in tensor.ranges]


@torch.inference_mode()
def forward_logits(model: PreTrainedModel, probe: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the probe, as the model computes them (bf16)."""
    device = next(model.parameters()).device
    return model(input_ids=probe.to(device), use_cache=False).logits


__all__ = [
    "ACTIVATION_EPS",
    "Fp8Linear",
    "build_model",
    "expected_shapes",
    "forward_logits",
    "hf_config",
    "install_fp8",
    "load_weights",
    "quantize_activations",
    "tied_names",
]
