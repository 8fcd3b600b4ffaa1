from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.settings import DEFAULT_CONFIG, Settings, load_settings, read_yaml

TOKENS = {"REFITD_AUTH__TRAINER_TOKEN": "t" * 20, "REFITD_AUTH__ADMIN_TOKEN": "a" * 20}


def _with_tokens(mp: pytest.MonkeyPatch) -> None:
    for k, v in TOKENS.items():
        mp.setenv(k, v)


def test_defaults_come_from_the_shipped_yaml(clean_env: pytest.MonkeyPatch) -> None:
    _with_tokens(clean_env)
    s = load_settings()
    assert s.server.host == "127.0.0.1"
    assert s.server.port == 8470
    assert s.redis.url == "embedded"
    assert s.ranks.tp_size == 1
    assert s.ranks.launch == "local"
    assert s.verification.enabled is True
    assert s.dev_mode is False


def test_every_default_field_is_documented_in_the_yaml() -> None:
    documented = read_yaml(DEFAULT_CONFIG)
    text = DEFAULT_CONFIG.read_text()
    from orchestrator.settings import Settings

    for name, field in Settings.model_fields.items():
        assert name in documented, f"{name} missing from {DEFAULT_CONFIG}"
        sub = field.annotation
        for child in getattr(sub, "model_fields", {}):
            assert f"{child}:" in text, f"{name}.{child} missing from {DEFAULT_CONFIG}"


def test_file_then_env_then_arguments(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ranks:\n  tp_size: 2\nserver:\n  port: 9000\ndev_mode: true\n")
    assert load_settings(cfg).ranks.tp_size == 2
    clean_env.setenv("REFITD_RANKS__TP_SIZE", "4")
    s = load_settings(cfg)
    assert s.ranks.tp_size == 4
    assert s.server.port == 9000  # untouched by env
    assert load_settings(cfg, data_dir=tmp_path / "d").data_dir == tmp_path / "d"


def test_list_settings_take_json_from_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("REFITD_DEV_MODE", "true")
    clean_env.setenv("REFITD_SOURCES__ALLOWED_ROOTS", f'["{tmp_path}"]')
    assert load_settings().sources.allowed_roots == [tmp_path]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("bogus: 1\n", "bogus: unknown setting"),
        ("ranks:\n  tp_sise: 2\n", "ranks.tp_sise: unknown setting"),
        ("ranks:\n  tp_size: 0\n", "ranks.tp_size"),
        ("ranks:\n  launch: cloud\n", "ranks.launch"),
        ("- a\n- b\n", "mapping at its top level"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_files_are_one_clear_error(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, yaml_text: str, message: str
) -> None:
    _with_tokens(clean_env)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg)


def test_missing_config_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_tokens_are_required_outside_dev_mode(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"auth\.trainer_token is not set"):
        load_settings()
    clean_env.setenv("REFITD_AUTH__TRAINER_TOKEN", "t" * 20)
    with pytest.raises(ConfigError, match=r"auth\.admin_token is not set"):
        load_settings()
    clean_env.setenv("REFITD_AUTH__ADMIN_TOKEN", "short")
    with pytest.raises(ConfigError, match="shorter than 16"):
        load_settings()
    clean_env.setenv("REFITD_AUTH__ADMIN_TOKEN", "t" * 20)
    with pytest.raises(ConfigError, match="must differ"):
        load_settings()


def test_dev_mode_refuses_a_public_bind(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("REFITD_DEV_MODE", "true")
    assert load_settings().auth.trainer_token is None
    clean_env.setenv("REFITD_SERVER__HOST", "0.0.0.0")
    with pytest.raises(ConfigError, match="not a loopback address"):
        load_settings()


def test_public_bind_with_tokens_is_allowed(clean_env: pytest.MonkeyPatch) -> None:
    _with_tokens(clean_env)
    clean_env.setenv("REFITD_SERVER__HOST", "0.0.0.0")
    assert load_settings().server.host == "0.0.0.0"


def test_missing_redis_binary_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    _with_tokens(clean_env)
    clean_env.setenv("REFITD_REDIS__SERVER_BINARY", "no-such-redis-server")
    with pytest.raises(ConfigError, match="not on PATH"):
        load_settings()
    # With an external Redis the binary is not needed.
    clean_env.setenv("REFITD_REDIS__URL", "redis://127.0.0.1:1/0")
    assert load_settings().redis.url.startswith("redis://")


def test_tokens_do_not_show_in_repr(clean_env: pytest.MonkeyPatch) -> None:
    _with_tokens(clean_env)
    assert "t" * 20 not in repr(load_settings())


def test_each_load_reads_its_own_file_as_it_is_now(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("dev_mode: true\nranks: {tp_size: 2}\n")
    two.write_text("dev_mode: true\nranks: {tp_size: 3, launch: external}\n")
    assert load_settings(one).ranks.tp_size == 2
    assert (load_settings(two).ranks.tp_size, load_settings(two).ranks.launch) == (3, "external")
    one.write_text("dev_mode: true\nranks: {tp_size: 5}\n")  # edited between two loads
    assert load_settings(one).ranks.tp_size == 5
    # A nested env override replaces one key and leaves the file's siblings alone.
    clean_env.setenv("REFITD_RANKS__LAUNCH", "local")
    assert (load_settings(two).ranks.tp_size, load_settings(two).ranks.launch) == (3, "local")
    assert isinstance(load_settings(two), Settings)
