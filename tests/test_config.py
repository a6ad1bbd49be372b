"""config.yaml is the single source of defaults; profiles, env, --set and flags override it; errors name the key."""
import shutil

import pytest
from conftest import run_script

from common.config import DEFAULT_CONFIG, ConfigError, load_config


@pytest.fixture
def config_copy(tmp_path):
    path = tmp_path / "config.yaml"
    shutil.copy(DEFAULT_CONFIG, path)
    return path


def test_profile_overlay_and_plain_values():
    tiny, plain = load_config(use_env=False), load_config(profile="none", use_env=False)
    assert tiny.profile == "tiny" and tiny.model.path == "models/tiny-qwen3"
    assert plain.profile is None and plain.model.path == "models/Qwen/Qwen3-8B"
    assert plain.serve.max_concurrent == 3 and plain.serve.max_tokens == 512


def test_environment_overrides_are_typed(monkeypatch):
    monkeypatch.setenv("PORT", "9123")
    monkeypatch.setenv("QWEN_PROFILE", "none")
    cfg = load_config()
    assert cfg.serve.port == 9123 and cfg.profile is None


def test_dotted_overrides_win_over_env(monkeypatch):
    monkeypatch.setenv("PORT", "9123")
    assert load_config(overrides={"serve.port": 7000}).serve.port == 7000


@pytest.mark.parametrize("edit,message", [
    (("serve:\n", "serve:\n  max_concurent: 4\n"), "unknown config key 'serve.max_concurent'"),
    (("  port: 8000", "  port: eight"), "config key 'serve.port' must be int"),
    (("  enable_thinking: false", "  enable_thinking: 0"), "'prompt.enable_thinking' must be bool"),
    (("profile: tiny", "profile: huge"), "unknown profile 'huge'"),
    (("      min_free_disk_gb: 1", "      min_free_gb: 1"), "unknown config key 'verify.min_free_gb'"),
    (("  max_tokens: 512", ""), "config key 'serve.max_tokens' is missing"),
])
def test_errors_name_the_key(config_copy, edit, message):
    text = config_copy.read_text()
    assert edit[0] in text
    config_copy.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(config_copy, use_env=False)


def test_scientific_notation_is_a_float(config_copy):
    config_copy.write_text(config_copy.read_text().replace("gpu_memory_gib: null", "gpu_memory_gib: 1e1"))
    assert load_config(config_copy, use_env=False).verify.gpu_memory_gib == 10.0


def test_cli_flags_and_errors(config_copy):
    proc = run_script("verify_setup.py", "--help")
    assert proc.returncode == 0 and "python verify_setup.py" in proc.stdout
    assert "default verify.min_free_disk_gb: 1.0" in proc.stdout  # the value config.yaml gives, via the profile
    proc = run_script("verify_setup.py", "--set", "serve.port=abc", "--quick")
    assert proc.returncode == 1 and "serve.port' must be int" in proc.stderr and "Traceback" not in proc.stderr
    config_copy.write_text(config_copy.read_text().replace("  level: INFO", "  level: INFO\n  colour: true"))
    proc = run_script("verify_setup.py", "--config", str(config_copy))
    assert proc.returncode == 1 and "unknown config key 'logging.colour'" in proc.stderr


def test_any_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("QWEN_SERVE_REQUEST_TIMEOUT_S", "0.5")
    monkeypatch.setenv("QWEN_TRAIN_TARGET_MODULES", "q_proj,v_proj")
    cfg = load_config()
    assert cfg.serve.request_timeout_s == 0.5 and cfg.train.target_modules == ["q_proj", "v_proj"]
    monkeypatch.setenv("QWEN_SERVER_PORT", "1")
    with pytest.raises(ConfigError, match="QWEN_SERVER_PORT: no config section 'server'"):
        load_config()


def test_one_key_two_routes_must_agree(monkeypatch):
    monkeypatch.setenv("PORT", "9000")
    monkeypatch.setenv("QWEN_SERVE_PORT", "9000")
    assert load_config().serve.port == 9000  # the same value by both routes is fine
    monkeypatch.setenv("QWEN_SERVE_PORT", "9100")
    with pytest.raises(ConfigError, match="PORT and QWEN_SERVE_PORT both set serve.port"):
        load_config()


def test_secrets_come_from_the_environment(monkeypatch, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# one a line\nsk-file\n")
    monkeypatch.setenv("API_KEYS", "sk-a,sk-b")
    monkeypatch.setenv("API_KEYS_FILE", str(keys))
    from common.serving.worker import api_keys
    assert api_keys(load_config().serve) == ["sk-a", "sk-b", "sk-file"]


def test_env_example_documents_every_named_variable():
    from common.config import ENV_KEYS, ROOT
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert [var for var in ENV_KEYS if f"# {var}=" not in text] == []
