"""The model families the verification gate is calibrated on, made by the tests themselves.

- `trained`: a tiny Qwen3-style byte-level model trained here, on the CPU, on bytes of Python's
  standard-library sources (200 AdamW steps, ~12 s of CPU; cached under pytest's cache dir).
  Its logits are confident where the text is predictable and spread where it is not, as a real
  model's are.
- `random <std>`: random-init models (every linear weight and the embeddings from N(0, std), norms
  ones, as Hugging Face initializes them) at std 0.02, 0.05 and 0.1, in the shape of issue 11
  (intermediate 320: the MLP falls back to per-channel at every TP size) and an aligned variant
  (intermediate 512: blockwise where the TP shards allow). Their logits are nearly tied: rounding
  flips the top token at many positions, which the gate must not call a fault.
- `llama`, `qwen2`, `qwen3`: the trained-looking synthetic weights of tests/orchestrator/
  _tiny_models.py (heavy tails, uneven row and column scales, spread logits).

An honest update of each: the random families' weights plus N(0, 0.002) noise (issue 11's
update), the synthetic ones one `synthetic.honest_update` step, the trained model its own
weights. Shared by tests/orchestrator/model/test_verification_calibration.py and
`bench/verify.py --table`, so the table in docs/verification-notes.md is measured on exactly the
cases the tests assert on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sysconfig
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from orchestrator.model import synthetic
from orchestrator.model.hf_model import build_model, expected_shapes, hf_config
from orchestrator.model.planner import ModelPlan
from orchestrator.model.probe import probe_batch
from tests.orchestrator import _tiny_models as tiny

State = dict[str, torch.Tensor]

_QWEN3_TINY: dict[str, Any] = {
    "model_type": "qwen3",
    "vocab_size": 512,
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
# Issue 11's model: intermediate 320, so the MLP is per-channel at every TP size.
ISSUE_11: dict[str, Any] = {**_QWEN3_TINY, "intermediate_size": 320}
ALIGNED: dict[str, Any] = {**_QWEN3_TINY, "intermediate_size": 512}

# Byte-level: 256 tokens. q, o and the MLP are blockwise at TP 1 (k and v, 64 rows, per-channel).
TRAINED: dict[str, Any] = {
    "model_type": "qwen3",
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
TRAIN_STEPS = 200
TRAIN_BATCH, TRAIN_LENGTH = 12, 64
_TRAIN_FILES = ("argparse.py", "inspect.py", "typing.py", "dataclasses.py", "enum.py")
_PROBE_FILE = "textwrap.py"  # held out: the text probe is text the model has not seen

RANDOM_STDS = (0.02, 0.05, 0.1)
UPDATE_NOISE = 0.002
TP_SIZES = (1, 2, 4)


@dataclass(frozen=True, eq=False)  # hashed by identity: the functions hold dicts
class Family:
    """A model family: its config, its honest update (seeded) and the probe it is scored on."""

    name: str
    config: Mapping[str, Any]
    update: Callable[[int], State]
    probe: Callable[[], torch.Tensor]


def random_init(config: Mapping[str, Any], std: float, seed: int) -> State:
    """Every 2-D weight (linear and embedding) from N(0, std), every norm ones; bf16."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(build_model(config)).items():
        if len(shape) == 2:
            t = torch.randn(shape, generator=gen) * std
        elif name.endswith("norm.weight"):
            t = torch.ones(shape)
        else:
            raise AssertionError(f"no init for {name} {shape}")
        state[name] = t.to(torch.bfloat16)
    return state


def noisy(state: Mapping[str, torch.Tensor], seed: int, std: float = UPDATE_NOISE) -> State:
    """Issue 11's update: every tensor plus N(0, std) noise."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (t.float() + torch.randn(t.shape, generator=gen) * std).to(torch.bfloat16)
        for name, t in state.items()
    }


def _stdlib_bytes(names: tuple[str, ...]) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    return b"".join((root / name).read_bytes() for name in names)


def text_probe(count: int = 8, length: int = 64) -> torch.Tensor:
    """`count` runs of `length` bytes of a standard-library file the trained model never saw."""
    text = _stdlib_bytes((_PROBE_FILE,))
    step = (len(text) - length) // count
    rows = [list(text[i * step : i * step + length]) for i in range(count)]
    return torch.tensor(rows, dtype=torch.int64)


def trained_state(cache_dir: Path | None = None) -> State:
    """The trained byte-level model's weights (bf16), from `cache_dir` when trained before."""
    data = _stdlib_bytes(_TRAIN_FILES)
    key = hashlib.sha256(
        json.dumps([TRAINED, TRAIN_STEPS, TRAIN_BATCH, TRAIN_LENGTH], sort_keys=True).encode()
        + data
    ).hexdigest()[:16]
    path = cache_dir / f"trained-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return load_file(path)
    state = _train(data)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file(state, partial)
        partial.replace(path)
    return state


def _train(data: bytes) -> State:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(TRAINED))
    model.train()
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, TRAIN_STEPS)
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, len(tokens) - TRAIN_LENGTH, (TRAIN_BATCH,), generator=gen)
        batch = torch.stack([tokens[s : s + TRAIN_LENGTH] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    keep = set(expected_shapes(build_model(TRAINED)))
    return {
        name: t.detach().to(torch.bfloat16).contiguous()
        for name, t in model.state_dict().items()
        if name in keep
    }


def families(cache_dir: Path | None = None) -> list[Family]:
    """Every family of the calibration (the trained one trains on first use)."""
    out = [
        Family(
            "trained (text probe)",
            TRAINED,
            lambda seed: _trained(cache_dir),
            text_probe,
        ),
        Family(
            "trained (random probe)",
            TRAINED,
            lambda seed: _trained(cache_dir),
            lambda: probe_batch(TRAINED["vocab_size"]),
        ),
    ]
    for std in RANDOM_STDS:
        for label, shape in (("", "issue 11"), (", aligned", "aligned")):
            config = _RANDOM_SHAPES[shape]
            out.append(
                Family(
                    f"random {std:g}{label}",
                    config,
                    functools.partial(_random_update, shape, std),
                    functools.partial(probe_batch, config["vocab_size"]),
                )
            )
    for name, config in tiny.CONFIGS.items():
        out.append(
            Family(
                f"{name} (trained-looking)",
                config,
                functools.partial(_synthetic_update, name),
                functools.partial(probe_batch, config["vocab_size"]),
            )
        )
    return out


@functools.cache
def _trained(cache_dir: Path | None) -> State:
    return trained_state(cache_dir)


_RANDOM_SHAPES = {"issue 11": ISSUE_11, "aligned": ALIGNED}


@functools.cache
def _random_update(shape: str, std: float, seed: int) -> State:
    return noisy(random_init(_RANDOM_SHAPES[shape], std, seed), seed + 1000)


@functools.cache
def _synthetic_update(name: str, seed: int) -> State:
    config = tiny.CONFIGS[name]
    return synthetic.honest_update(synthetic.base_state(config, seed), seed + 100)


@functools.cache
def shipped(family: Family, tp: int, seed: int = 0) -> tuple[ModelPlan, list[State]]:
    """Plan, quantize and shard a family's honest update for `tp` ranks, as the daemon does."""
    return tiny.ship(family.config, family.update(seed), tp)
