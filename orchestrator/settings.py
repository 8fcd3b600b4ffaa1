"""The one typed settings object: `configs/refitd.yaml` (or `--config FILE`), overridden by env.

Env overrides are `REFITD_` + the key path joined by `__`, e.g. `REFITD_RANKS__TP_SIZE=4`.
Precedence, highest first: explicit keyword arguments, environment, the YAML file, defaults.
The YAML file is read by pydantic-settings' own YAML source, from the class config's `yaml_file`.
"""

from __future__ import annotations

import functools
import ipaddress
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from orchestrator.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "refitd.yaml"
MIN_TOKEN_LENGTH = 16


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8470, ge=0, le=65535)


class RedisSettings(_Section):
    url: str = "embedded"
    server_binary: str = "redis-server"
    conf: Path = REPO_ROOT / "configs" / "redis.conf"
    key_prefix: str = Field("refitd", pattern=r"^[A-Za-z0-9_.-]+$")
    start_timeout_s: float = Field(10.0, gt=0)
    # The embedded server is restarted when it dies, up to max_restarts times in
    # restart_window_s; one more death in that window and `refitd serve` exits non-zero.
    max_restarts: int = Field(5, ge=0)
    restart_window_s: float = Field(60.0, gt=0)


class AuthSettings(_Section):
    trainer_token: SecretStr | None = None
    admin_token: SecretStr | None = None


class ModelSettings(_Section):
    config: Path | None = None


class RankSettings(_Section):
    tp_size: int = Field(1, ge=1, le=64)
    launch: Literal["local", "external"] = "local"
    device: str = "auto"
    heartbeat_interval_s: float = Field(0.5, gt=0)
    heartbeat_timeout_s: float = Field(3.0, gt=0)
    restart_backoff_s: float = Field(0.5, ge=0)
    fetch: Literal["auto", "path", "http"] = "auto"
    artifact_url: str | None = None
    transport: Literal["auto", "ipc", "distributed", "http"] = "auto"
    keep_previous: bool = True
    # The `distributed` route (torch.distributed; configs/refitd.yaml says what each one means).
    dist_host: str | None = None
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    dist_bucket_mb: float = Field(256, gt=0, le=4096)


class DataPathSettings(_Section):
    staging_bucket_mb: int = Field(64, ge=1, le=4096)
    staging_buckets: int = Field(16, ge=2, le=256)
    reader_threads: int = Field(16, ge=1, le=64)


class SourceSettings(_Section):
    allowed_roots: list[Path] = Field(default_factory=list)


class LimitSettings(_Section):
    max_upload_bytes: int = Field(64 * 2**30, gt=0)
    max_tensors: int = Field(20_000, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    queue_depth: int = Field(4, ge=0)
    tensor_updates_waiting: int = Field(1, ge=1)


class QuantizationSettings(_Section):
    ignore: list[str] = Field(default_factory=list)


class ProbeSettings(_Section):
    seed: int = 0
    count: int = Field(8, ge=1)
    length: int = Field(64, ge=2)
    token_ids: list[list[int]] | None = None


class ThresholdSettings(_Section):
    max_mean_kl: float = Field(0.05, gt=0)
    max_max_kl: float = Field(1.0, gt=0)
    min_top1_near_agreement: float = Field(0.9, ge=0, le=1)
    top1_margin_nats: float = Field(1.0, gt=0)
    max_abs_logit_diff: float = Field(5.0, gt=0)
    max_weight_error: float = Field(0.0625, gt=0)


class DriftSettings(_Section):
    enabled: bool = False
    max_mean_kl: float = Field(1.0, gt=0)


class VerificationSettings(_Section):
    enabled: bool = True
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    thresholds: ThresholdSettings = Field(default_factory=ThresholdSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)


class RolloutSettings(_Section):
    prepare_deadline_s: float = Field(30.0, gt=0)
    commit_deadline_s: float = Field(30.0, gt=0)
    retention: int = Field(5, ge=2)
    lock_ttl_s: float = Field(120.0, gt=0)


class Settings(BaseSettings):
    """Everything refitd can be told. See `configs/refitd.yaml` for each field's meaning."""

    model_config = SettingsConfigDict(
        env_prefix="REFITD_",
        env_nested_delimiter="__",
        extra="forbid",
        yaml_file=None,  # no file unless load_settings names one (see _reading)
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    data_dir: Path = Path(".refitd")
    dev_mode: bool = False
    redis: RedisSettings = Field(default_factory=RedisSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    ranks: RankSettings = Field(default_factory=RankSettings)
    sources: SourceSettings = Field(default_factory=SourceSettings)
    data_path: DataPathSettings = Field(default_factory=DataPathSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings)
    verification: VerificationSettings = Field(default_factory=VerificationSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlFile(settings_cls))

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        trainer = self.auth.trainer_token.get_secret_value() if self.auth.trainer_token else ""
        admin = self.auth.admin_token.get_secret_value() if self.auth.admin_token else ""
        if self.dev_mode:
            # Dev mode may run without tokens, so it must never listen beyond this machine.
            if not _is_loopback(self.server.host):
                raise ValueError(
                    f"server.host={self.server.host!r} is not a loopback address; dev_mode allows "
                    "missing tokens and so only binds to loopback"
                )
            return self
        for name, token in (("trainer_token", trainer), ("admin_token", admin)):
            if not token:
                raise ValueError(
                    f"auth.{name} is not set (set REFITD_AUTH__{name.upper()}, or dev_mode: true "
                    "for a loopback-only development daemon)"
                )
            if len(token) < MIN_TOKEN_LENGTH:
                raise ValueError(f"auth.{name} is shorter than {MIN_TOKEN_LENGTH} characters")
        if trainer == admin:
            raise ValueError("auth.trainer_token and auth.admin_token must differ")
        return self

    @property
    def embedded_redis(self) -> bool:
        return self.redis.url == "embedded"

    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()


class _YamlFile(YamlConfigSettingsSource):
    """pydantic-settings' YAML source, reading through read_yaml for one clear error per bad
    file (not YAML, not a mapping) instead of a parser traceback."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        return read_yaml(Path(file_path))


@functools.lru_cache(maxsize=32)
def _reading(path: Path) -> type[Settings]:
    """Settings whose YAML source is `path`. pydantic-settings takes a source's file from the
    class config, never from a call, so each file gets a subclass that only names it."""
    config = SettingsConfigDict(yaml_file=path)
    return type("Settings", (Settings,), {"model_config": config, "__module__": __name__})


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a settings YAML file; an empty file is an empty mapping."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at its top level")
    return data


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from a YAML file (default `configs/refitd.yaml`), env and overrides.

    Raises ConfigError with one readable line per problem.
    """
    path = config if config is not None else DEFAULT_CONFIG
    if config is not None and not config.exists():
        raise ConfigError(f"config file {config} does not exist")
    settings_cls = _reading(path.resolve()) if path.exists() else Settings
    try:
        settings = settings_cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    if settings.embedded_redis and shutil.which(settings.redis.server_binary) is None:
        raise ConfigError(
            f"redis.url is 'embedded' but {settings.redis.server_binary!r} is not on PATH "
            "(install Debian's redis-server: apt-get install redis-server, or set redis.url)"
        )
    return settings


def _describe(exc: ValidationError, path: Path) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        lines.append(f"{loc}: {msg}")
    return f"invalid settings ({path}, REFITD_* env): " + "; ".join(lines)


__all__ = ["DEFAULT_CONFIG", "REPO_ROOT", "Settings", "load_settings", "read_yaml"]
