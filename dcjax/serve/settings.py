"""`config.serve` as a checked, typed `Settings` (the section's defaults live in
dcjax/config.py's `base_config`; docs/serving.md describes each field)."""

from __future__ import annotations

import dataclasses
import os

from dcjax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Settings:
  host: str
  port: int
  model_name: str
  batch_size: int
  batch_window_ms: float
  prompt_bucket: int
  max_prompt_tokens: int
  max_tokens: int
  max_request_rows: int
  max_programs: int
  request_timeout_s: float
  max_requests: int
  warmup: bool


_POSITIVE = ("batch_size", "prompt_bucket", "max_prompt_tokens", "max_tokens", "max_request_rows")
_NON_NEGATIVE = ("port", "max_programs", "max_requests")


def settings_from_config(config) -> Settings:
  """Settings of `config.serve`; ConfigError naming the first bad field."""
  section = config.get("serve")
  if section is None:
    raise ConfigError("config.serve is missing (see dcjax/config.py base_config)")
  values = {}
  for field in dataclasses.fields(Settings):
    where = f"config.serve.{field.name}"
    if field.name not in section:
      raise ConfigError(f"{where} is missing (see dcjax/config.py base_config)")
    value = section[field.name]
    kind = {"float": (int, float), "int": int, "str": str, "bool": bool}[field.type]
    if (isinstance(value, bool) and field.type != "bool") or not isinstance(value, kind):
      raise ConfigError(f"{where}={value!r} must be of type {field.type}")
    values[field.name] = value
  for name in _POSITIVE:
    if values[name] < 1:
      raise ConfigError(f"config.serve.{name}={values[name]} must be >= 1")
  for name in _NON_NEGATIVE:
    if values[name] < 0:
      raise ConfigError(f"config.serve.{name}={values[name]} must be >= 0")
  if values["port"] > 65535:
    raise ConfigError(f"config.serve.port={values['port']} must be <= 65535")
  for name in ("batch_window_ms", "request_timeout_s"):
    if values[name] < 0:
      raise ConfigError(f"config.serve.{name}={values[name]} must be >= 0")
  if not values["host"]:
    raise ConfigError("config.serve.host is empty (127.0.0.1: this machine only)")
  if not values["model_name"]:
    hf_dir = str(config.get("hf_dir") or "").rstrip("/")
    values["model_name"] = os.path.basename(hf_dir) if hf_dir else "dcjax"
  return Settings(**values)
