"""Configuration: config.yaml holds every default once; common/config_schema.py its types; this module reads it.

Order of precedence (later wins): config.yaml -> the selected profile's overlay -> environment
variables (and .env) for deployment knobs -> `--set section.key=value` -> a stage's own flags.
Unknown keys and wrong types are errors that name the key, so a typo never passes silently.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from common.config_schema import ROOT  # the repo root; config paths are relative to it

DEFAULT_CONFIG = ROOT / "config.yaml"


class UserError(Exception):
    """A problem the user caused and can fix: a stage prints its message as one sentence and exits 1
    (common/cli.py). Every stage's own error (DataError, MergeError, ...) is one of these."""


class ConfigError(UserError, ValueError):
    """A user-fixable problem with config.yaml, a profile, an env variable or a flag."""


# The schema, one dataclass a section (common/config_schema.py); re-exported: the stages import them from here.
from common.config_schema import (  # noqa: E402
                                  Config, DataConfig, DownloadConfig, EvaluateConfig, LoggingConfig, MergeConfig, ModelConfig, PromptConfig,
                                  QuantizeConfig, ServeConfig, TinyConfig, TrainConfig, VerifyConfig)

__all__ = ["ROOT", "Config", "ConfigError", "DataConfig", "DownloadConfig", "EvaluateConfig", "ENV_KEYS",
           "LoggingConfig", "MergeConfig", "ModelConfig", "PromptConfig", "QuantizeConfig", "ServeConfig",
           "TinyConfig", "TrainConfig", "UserError", "VerifyConfig", "load_config", "parse_text"]


# The named environment variables: deployment knobs and secrets, each an alias of one config key
# (.env.example documents every one; tests/test_config.py checks that it does). Any key can also be
# set as QWEN_<SECTION>_<KEY>; setting both routes of one key to different values is an error.
ENV_KEYS = {
    "QWEN_PROFILE": "profile",
    "MODEL_PATH": "serve.model",
    "ADAPTER_PATH": "serve.adapter",
    "HOST": "serve.host",
    "FRONT": "serve.front",
    "PORT": "serve.port",
    "WORKERS": "serve.workers",
    "QUANTIZATION": "serve.quantization",
    "MAX_CONCURRENT": "serve.max_concurrent",
    "MAX_QUEUE": "serve.max_queue",
    "RATE_LIMITS": "serve.rate_limits",
    "RATE_LIMIT_STORAGE": "serve.rate_limit_storage",
    "TRUSTED_PROXIES": "serve.trusted_proxies",
    "API_KEYS": "serve.api_keys",
    "API_KEYS_FILE": "serve.api_keys_file",
    "LOG_LEVEL": "logging.level",
    "LOGS_DIR": "logging.dir",
}


# ----------------------------------------------------------------------------- typing
def _check_type(value, tp, key: str):
    """Return value converted to tp, or raise ConfigError naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-4 as a string; accept it as the number it obviously is
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    return value


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})")
    values = {}
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in data:
            raise ConfigError(f"config key '{key}' is missing")
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            values[f.name] = _build(tp, data[f.name], key + ".")
        else:
            values[f.name] = _check_type(data[f.name], tp, key)
    return cls(**values)


# ----------------------------------------------------------------------------- merging
def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"unknown config key '{dotted}'")
        node = node[p]
    node[leaf] = value


def _field_type(dotted: str):
    tp = Config
    for part in dotted.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            raise ConfigError(f"unknown config key '{dotted}'")
        tp = hints[part]
    return tp


def parse_text(dotted: str, text: str):
    """Text from env, --set or a flag, typed by the key: '8000' -> 8000 for an int, kept for a str."""
    tp = _field_type(dotted)
    optional_str = typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
    if tp is str or (optional_str and text not in ("null", "~")):
        return text
    if typing.get_origin(tp) is list and not text.lstrip().startswith("["):
        return [_parse_text_item(item) for item in text.split(",") if item.strip()]  # --targets q_proj,v_proj
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _parse_text_item(text: str):
    value = yaml.safe_load(text)
    return value if value is not None else text.strip()


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; run from the repo or pass --config PATH")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def load_config(path: str | os.PathLike | None = None, profile: str | None = None,
                overrides: dict[str, object] | None = None, use_env: bool = True) -> Config:
    """Read config.yaml, apply the profile, the environment and dotted overrides; validate."""
    if use_env:
        _load_dotenv()
    path = Path(path or os.environ.get("QWEN_CONFIG") or DEFAULT_CONFIG)
    raw = _read_yaml(path)
    profiles = raw.pop("profiles", None) or {}
    for name, overlay in profiles.items():  # a typo in any profile is an error, selected or not
        _build(Config, _deep_merge(raw, overlay or {}), "")
    env = _env_overrides() if use_env else {}
    if profile is not None:
        env["profile"] = profile
    chosen = env.get("profile", raw.get("profile"))
    for name in [] if chosen in (None, "none") else [n.strip() for n in str(chosen).split(",")]:
        if name not in profiles:  # several overlays apply in order: tiny,reviews
            raise ConfigError(f"unknown profile '{name}' (config.yaml defines: {', '.join(profiles) or 'none'})")
        raw = _deep_merge(raw, profiles[name] or {})
    for dotted, value in {**env, **(overrides or {})}.items():
        _set_dotted(raw, dotted, value)
    raw["profile"] = None if chosen == "none" else chosen
    return _build(Config, raw, "")


def _env_overrides() -> dict[str, object]:
    """The named variables (ENV_KEYS), and QWEN_<SECTION>_<KEY> for any key (QWEN_SERVE_MAX_QUEUE=20)."""
    sections = {f.name for f in fields(Config) if dataclasses.is_dataclass(typing.get_type_hints(Config)[f.name])}
    routes: dict[str, tuple[str, str]] = {}  # dotted key -> (variable, text)
    for var, text in os.environ.items():
        if text == "" or var == "QWEN_CONFIG" or not (var in ENV_KEYS or var.startswith("QWEN_")):
            continue
        dotted = ENV_KEYS.get(var)
        if dotted is None:
            section, _, key = var[5:].lower().partition("_")
            if section not in sections:
                raise ConfigError(f"environment variable {var}: no config section '{section}' "
                                  f"(QWEN_<SECTION>_<KEY>, sections: {', '.join(sorted(sections))})")
            dotted = f"{section}.{key}"
        if dotted in routes and routes[dotted][1] != text:
            raise ConfigError(f"environment variables {routes[dotted][0]} and {var} both set {dotted}, "
                              f"to different values; keep one")
        routes[dotted] = (var, text)
    return {dotted: parse_text(dotted, text) for dotted, (_, text) in routes.items()}


def _load_dotenv() -> None:
    """A .env file beside config.yaml sets variables that the real environment has not set."""
    from dotenv import load_dotenv
    load_dotenv(ROOT / ".env", override=False)
