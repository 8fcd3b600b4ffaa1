"""Tuned launch configurations, kept as data: one JSON file per device under kernels/configs/.

A file is looked up by the device's name (`torch.cuda.get_device_name`, lower-cased, runs of
other characters turned into '-': "NVIDIA H200" -> nvidia-h200.json), read once per process,
and a device without one gets the defaults below with one logged WARNING.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class BlockwiseConfig:
    """One program quantizes BLOCKS_PER_PROG 128x128 blocks, each read once into registers."""

    num_warps: int = 8
    blocks_per_prog: int = 1


@dataclass(frozen=True)
class PerChannelConfig:
    """Rows up to `max_single_pass_n` wide stay in registers (one read); wider rows are read
    twice in `chunk_n` chunks (amax pass, then scale pass, the second mostly from L2).
    A program takes as many rows as fit in `tile_elems` elements."""

    num_warps: int = 8
    tile_elems: int = 16384
    max_single_pass_n: int = 16384
    chunk_n: int = 4096


@dataclass(frozen=True)
class Fp8GemmConfig:
    """The blockwise FP8 GEMM (kernels/fp8_gemm.py): `block_m` tokens x 128 outputs per
    program, 128 channels per step. No autotuning: verification runs one probe size, and each
    weight shape compiles once per deployment."""

    block_m: int = 64
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # row tiles that walk one band of weight columns together (L2 reuse)


@dataclass(frozen=True)
class KernelConfigs:
    blockwise: BlockwiseConfig = BlockwiseConfig()
    per_channel: PerChannelConfig = PerChannelConfig()
    fp8_gemm: Fp8GemmConfig = Fp8GemmConfig()
    source: str = "defaults"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _section(cls: type, raw: dict[str, Any], path: Path) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} for {cls.__name__}")
    return replace(cls(), **raw)


def parse_config_file(path: Path) -> KernelConfigs:
    """Read one device's JSON file (unknown keys are an error, so a typo cannot pass silently)."""
    raw = json.loads(path.read_text())
    return KernelConfigs(
        blockwise=_section(BlockwiseConfig, raw.get("blockwise", {}), path),
        per_channel=_section(PerChannelConfig, raw.get("per_channel", {}), path),
        fp8_gemm=_section(Fp8GemmConfig, raw.get("fp8_gemm", {}), path),
        source=str(path),
    )


@functools.cache
def configs_for(device_name: str) -> KernelConfigs:
    """The tuned configs for a device name, or the defaults (logged once per name)."""
    path = CONFIG_DIR / f"{device_slug(device_name)}.json"
    if path.is_file():
        return parse_config_file(path)
    log.warning(
        "no tuned kernel config for device %r (looked for %s); using defaults", device_name, path
    )
    return KernelConfigs()


def configs_for_tensor(t: torch.Tensor) -> KernelConfigs:
    """Configs for the device a tensor lives on; CPU tensors (the Triton interpreter) get the
    defaults without a warning: nothing there is tuned for speed."""
    if t.device.type != "cuda":
        return KernelConfigs(source="defaults (not a CUDA device)")
    return configs_for(torch.cuda.get_device_name(t.device))
