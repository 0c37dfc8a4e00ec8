"""Settings: defaults give the embedded mode; TOML, then environment, override."""

import pytest

from queue_engine.errors import SettingsError
from queue_engine.settings import STANDARD_WEBHOOK_DELAYS, load_settings


def test_settings_defaults_are_embedded_mode(tmp_path):
    """With no configuration: no broker, a SQLite file in the data dir, a tiny profile."""
    settings = load_settings(environ={"XDG_DATA_HOME": str(tmp_path)})
    assert settings.is_embedded
    assert settings.broker_url is None
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path / 'queue-engine' / 'queue-engine.db'}"
    assert settings.models["tiny"].path == "tiny"
    assert settings.webhook_retry_delays == list(STANDARD_WEBHOOK_DELAYS)
    assert settings.tribunal.bypass_backlog == 500
    assert (settings.autoscaler.interval, settings.autoscaler.idle_grace) == (5.0, 120.0)


def test_settings_environment_overrides_toml(tmp_path):
    """QUEUE_ENGINE_* variables win over the TOML file, which wins over defaults."""
    config = tmp_path / "qe.toml"
    config.write_text(
        'broker_url = "redis://toml:6379/0"\n'
        'database_url = "sqlite:///toml.db"\n'
        "[tribunal]\nbypass_backlog = 7\n"
        '[models.tiny-b]\npath = "tiny"\nengine_args = { seed = 1, max_model_len = 256 }\nmax_in_flight = 32\n'
        "[models.tiny-b.slurm]\ngpus = 2\nmax_workers = 3\n"
    )
    settings = load_settings(environ={
        "QUEUE_ENGINE_CONFIG": str(config),
        "QUEUE_ENGINE_BROKER_URL": "redis://env:6379/0",
        "QUEUE_ENGINE_WEBHOOK_ALLOW": "127.0.0.0/8, 10.0.0.0/8",
        "QUEUE_ENGINE_WEBHOOK_RETRY_DELAYS": "1,2,3",
    })
    assert settings.broker_url == "redis://env:6379/0"
    assert settings.database_url == "sqlite:///toml.db"
    assert settings.webhook_allow == ["127.0.0.0/8", "10.0.0.0/8"]
    assert settings.webhook_retry_delays == [1.0, 2.0, 3.0]
    assert settings.tribunal.bypass_backlog == 7
    profile = settings.profile("tiny-b")
    assert (profile.max_in_flight, profile.max_model_len, profile.slurm.gpus, profile.slurm.max_workers) == (32, 256, 2, 3)
    assert "tiny" in settings.models, "the tiny profile exists unless overridden"
    assert not settings.is_embedded


def test_settings_toml_can_override_tiny(tmp_path):
    """A [models.tiny] table replaces the built-in tiny profile."""
    config = tmp_path / "qe.toml"
    config.write_text('[models.tiny]\npath = "/models/tiny"\nmax_in_flight = 8\n')
    settings = load_settings(environ={"QUEUE_ENGINE_CONFIG": str(config)})
    assert settings.models["tiny"].path == "/models/tiny"
    assert settings.models["tiny"].max_in_flight == 8


def test_settings_reject_unknown_keys_with_their_name(tmp_path):
    """A typo in the config file is an error that names the key."""
    config = tmp_path / "qe.toml"
    config.write_text("brokr_url = 'redis://x'\n")
    with pytest.raises(SettingsError, match="brokr_url"):
        load_settings(environ={"QUEUE_ENGINE_CONFIG": str(config)})


def test_settings_reject_bad_values_from_environment():
    """A value that cannot be parsed names the setting."""
    with pytest.raises(SettingsError, match="max_attempts"):
        load_settings(environ={"QUEUE_ENGINE_MAX_ATTEMPTS": "many"})


def test_settings_missing_config_file_is_clear(tmp_path):
    """QUEUE_ENGINE_CONFIG pointing nowhere says so."""
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(environ={"QUEUE_ENGINE_CONFIG": str(tmp_path / "nope.toml")})


def test_settings_unknown_profile_lists_configured_ones():
    """Asking for a profile that does not exist names the ones that do."""
    with pytest.raises(SettingsError, match="configured: tiny"):
        load_settings(environ={}).profile("gpt-9")
