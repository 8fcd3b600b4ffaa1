"""A Hugging Face causal LM from its config.json alone, with the update's tensors as its weights.

No weights are downloaded or initialized: the model is built on the meta device and its
parameters are the update's tensors themselves (`load_state_dict(assign=True)`, or one layer at a
time by verification), so the bf16 model costs no copy beyond a dtype cast. How the candidate is
served in FP8: orchestrator/model/served.py.

Torch and transformers only.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from orchestrator.errors import ConfigError

BF16 = torch.bfloat16

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


def tied_sources(model: PreTrainedModel) -> dict[str, str]:
    """Tied parameter name -> the name of the parameter it is (lm_head -> the embedding)."""
    return dict(_TIED.get(model, {}))


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
    materialize_buffers(model, device)
    model.requires_grad_(False)
    stray = [name for name, t in model.named_parameters() if t.is_meta]
    assert not stray, f"parameters left on the meta device: {stray}"


def materialize_buffers(model: PreTrainedModel, device: torch.device) -> None:
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
    stray = [name for name, t in model.named_buffers() if t.is_meta]
    assert not stray, f"buffers left on the meta device: {stray}"


@torch.inference_mode()
def forward_logits(model: PreTrainedModel, probe: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the probe, as the model computes them (bf16)."""
    device = next(model.parameters()).device
    return model(input_ids=probe.to(device), use_cache=False).logits


__all__ = [
    "build_model",
    "expected_shapes",
    "forward_logits",
    "hf_config",
    "load_weights",
    "materialize_buffers",
    "tied_names",
    "tied_sources",
]
