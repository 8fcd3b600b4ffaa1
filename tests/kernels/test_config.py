"""Launch configs are data: every shipped JSON parses, a typo is refused, a missing device
falls back to the defaults with a warning."""

from __future__ import annotations

import json
import logging

import pytest

from kernels import config
from kernels.config import CONFIG_DIR, KernelConfigs, configs_for, device_slug, parse_config_file


def test_shipped_configs_parse():
    files = sorted(CONFIG_DIR.glob("*.json"))
    assert files, "at least the H200's tuned config ships"
    for path in files:
        cfgs = parse_config_file(path)
        assert cfgs.blockwise.num_warps in (1, 2, 4, 8, 16, 32)
        assert cfgs.per_channel.max_single_pass_n >= cfgs.per_channel.chunk_n
    assert (CONFIG_DIR / f"{device_slug('NVIDIA H200')}.json").is_file()


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"blockwise": {"num_warp": 8}}))
    with pytest.raises(ValueError, match="num_warp"):
        parse_config_file(path)


def test_missing_device_uses_defaults_and_warns(caplog):
    config.configs_for.cache_clear()
    with caplog.at_level(logging.WARNING, logger="kernels.config"):
        cfgs = configs_for("Imaginary GPU 9000")
        configs_for("Imaginary GPU 9000")
    assert cfgs == KernelConfigs()
    assert len([r for r in caplog.records if "Imaginary GPU 9000" in r.message]) == 1
