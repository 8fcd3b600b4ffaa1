"""Trained-looking random checkpoints of a Hugging Face config, for the demo, benchmarks and tests.

A random model at the usual 0.02 init gives nearly tied logits, where FP8 verification measures
rounding noise. These weights look trained instead: each linear weight has heavy-tailed entries
and per-row and per-column magnitudes (lognormal, so 128x128 blocks get unequal scales, as in real
checkpoints), norms are not all ones, and the lm_head spreads the logits over a few nats. No
weights are downloaded: the shapes come from the config alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from orchestrator.model.hf_model import build_model, expected_shapes

# Spread of the logits over the vocabulary (std, in nats) of the base model.
LOGIT_STD = 3.0
TAIL_DOF = 4
# Trained-looking heterogeneity: lognormal sigma of row and column magnitudes of each weight.
ROW_COL_SIGMA = 0.5


def base_state(
    config: Mapping[str, Any],
    seed: int = 0,
    *,
    logit_std: float | None = None,
    row_col_sigma: float | None = None,
    residual_scale: float | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """A trained-looking bf16 checkpoint of `config` (see the module docstring), on `device`.

    The output projections (o_proj, down_proj) are scaled by 1/sqrt(2 * layers), as GPT-2 does,
    so that the residual stream grows as in a trained model instead of with every layer.
    """
    logit_std = LOGIT_STD if logit_std is None else logit_std
    sigma = ROW_COL_SIGMA if row_col_sigma is None else row_col_sigma
    if residual_scale is None:
        residual_scale = 1.0 / math.sqrt(2 * int(config["num_hidden_layers"]))
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    shapes = expected_shapes(build_model(config))
    hidden = int(config["hidden_size"])
    tied = bool(config.get("tie_word_embeddings"))
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("embed_tokens.weight"):
            # Tied: the embedding is also the lm_head, so it sets the logit spread.
            std = logit_std / math.sqrt(hidden) if tied else 1.0
            t = randn(*shape) * std
        elif name == "lm_head.weight":
            t = randn(*shape) * (logit_std / math.sqrt(hidden))
        elif name.endswith("norm.weight"):
            t = torch.exp(0.2 * randn(*shape))
        elif name.endswith(".bias"):
            t = 0.3 * randn(*shape)
        elif len(shape) == 2:
            rows = torch.exp(sigma * randn(shape[0], 1))
            cols = torch.exp(sigma * randn(1, shape[1]))
            # Unequal magnitudes, not a larger gain: keep the weight's mean square at 1 / fan-in.
            rows, cols = rows / rows.square().mean().sqrt(), cols / cols.square().mean().sqrt()
            # Student-t with TAIL_DOF degrees of freedom, at unit variance: heavy tails make block
            # maxima (so scales) differ from block to block, as trained weights do.
            chi2 = torch.stack([randn(*shape).square() for _ in range(TAIL_DOF)]).sum(0)
            tails = randn(*shape) / torch.sqrt(chi2 / TAIL_DOF)
            tails = tails / math.sqrt(TAIL_DOF / (TAIL_DOF - 2))
            t = tails * rows * cols / math.sqrt(shape[1])
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                t = t * residual_scale
        else:
            raise AssertionError(f"no init for {name} {shape}")
        state[name] = t.to(torch.bfloat16)
    return state


def honest_update(
    previous: Mapping[str, torch.Tensor], seed: int = 1, step: float = 1e-3
) -> dict[str, torch.Tensor]:
    """One plausible training step: every tensor moves by `step` times its own std, at random."""
    out = {}
    gens: dict[torch.device, torch.Generator] = {}
    for name, t in previous.items():
        gen = gens.setdefault(t.device, torch.Generator(device=t.device).manual_seed(seed))
        w = t.float()
        noise = torch.randn(w.shape, generator=gen, device=t.device) * (step * float(w.std()))
        out[name] = (w + noise).to(t.dtype)
    return out


def outlier_update(
    previous: Mapping[str, torch.Tensor], factor: float, seed: int = 2, blocks: int = 4
) -> dict[str, torch.Tensor]:
    """A quantization-hostile update: in `blocks` 128x128 blocks of every linear weight, one
    element becomes `factor` times the tensor's largest magnitude."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(honest_update(previous, seed=seed))
    for name, t in out.items():
        if t.dim() != 2 or "embed_tokens" in name or name == "lm_head.weight":
            continue
        w = t.float().clone()
        peak = float(w.abs().max())
        for _ in range(blocks):
            r = int(torch.randint(0, w.shape[0], (1,), generator=gen))
            c = int(torch.randint(0, w.shape[1], (1,), generator=gen))
            w[r, c] = factor * peak * (1 if torch.rand(1, generator=gen) < 0.5 else -1)
        out[name] = w.to(t.dtype)
    return out
