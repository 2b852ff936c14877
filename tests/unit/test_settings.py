"""Settings: TOML + env, validated with messages that name the key; secrets masked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ari_push.settings import Secret, SettingsError, load, to_display

GOOD = """
[ari]
password = "ari-pass-123"
[ami]
secret_file = "ami.secret"
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "ami.secret").write_text("ami-secret-456\n")
    path = tmp_path / "ari-push.toml"
    path.write_text(text)
    return path


def test_good_config_loads_with_defaults_and_secret_file(tmp_path: Path) -> None:
    s = load(write(tmp_path, GOOD), environ={})
    assert s.ari.password == "ari-pass-123" and isinstance(s.ari.password, Secret)
    assert s.ami.secret == "ami-secret-456"  # trailing newline cut
    assert s.redis.embedded and s.calls.default_timeout == 30.0 and s.ari.app == "ari-push"
    assert "ari-pass-123" not in repr(s)


def test_env_overrides_file_values_with_types(tmp_path: Path) -> None:
    env = {"ARI_PUSH_CALLS__DEFAULT_TIMEOUT": "12.5", "ARI_PUSH_REDIS__URL": "redis://127.0.0.1:6390/1",
           "ARI_PUSH_CAPTURE__VENDOR_ALLOWED_HOSTS": '["*.notify.live.net"]', "ARI_PUSH_NODE_ID": "pbx-a"}
    s = load(write(tmp_path, GOOD), environ=env)
    assert s.calls.default_timeout == 12.5
    assert s.redis.url == "redis://127.0.0.1:6390/1" and not s.redis.embedded
    assert s.capture.vendor_allowed_hosts == ("*.notify.live.net",)
    assert s.node_id == "pbx-a"


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("[ari]\n[ami]\nsecret='x'\n", "ari.password", "is required"),
        (GOOD + "[webhook]\nurl='https://relay.example/push'\nsecret='k'\nproviders=['pigeon']\n",
         "webhook.providers", "unknown provider 'pigeon'"),
        (GOOD + "[calls]\ndefault_timeout=-5\n", "calls.default_timeout", "positive number"),
        (GOOD + "[calls]\ndefault_timeout='soon'\n", "calls.default_timeout", "must be a number"),
        (GOOD + "[ari]\n", "config", "not valid TOML"),
        (GOOD + "[calls]\ntimout=5\n", "calls.timout", "unknown key"),
        ("[ari]\npassword_file='missing.txt'\n[ami]\nsecret='x'\n", "ari.password_file", "cannot read"),
        (GOOD + "[redis]\nurl='http://127.0.0.1:6379'\n", "redis.url", "redis/rediss/unix URL"),
        (GOOD + "[ami]\n", "config", "not valid TOML"),
        (GOOD.replace("[ami]", "[ami]\nport=70000"), "ami.port", "TCP port"),
        (GOOD + "[[apns]]\ntopics=['com.example.voip']\n", "apns[0].key_file", "give a .p8 key"),
        (GOOD + "[[fcm]]\nproject_id='p'\n", "fcm[0].service_account", "is required"),
        (GOOD + "[capture]\nextra_providers=['apns']\n", "capture.extra_providers", "built in"),
        (GOOD + "[calls]\non_decline='ignore'\n", "calls.on_decline", "must be one of"),
        (GOOD + "[ari]\n".replace("[ari]\n", "") + "[log]\nformat='xml'\n", "log.format", "must be one of"),
    ],
)
def test_bad_configs_name_the_key_and_the_reason(tmp_path: Path, text: str, key: str, why: str) -> None:
    with pytest.raises(SettingsError) as err:
        load(write(tmp_path, text), environ={})
    assert err.value.key == key
    assert why in str(err.value)


def test_bad_env_override_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        load(write(tmp_path, GOOD), environ={"ARI_PUSH_CALLS__DEFAULT_TIMEOUT": "0"})
    assert err.value.key == "calls.default_timeout"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no such file"):
        load(tmp_path / "nope.toml", environ={})


def test_display_masks_every_secret(tmp_path: Path) -> None:
    shown = json.dumps(to_display(load(write(tmp_path, GOOD), environ={})))
    assert "ari-pass-123" not in shown and "ami-secret-456" not in shown
    assert '"password": "\\u2026(12)"' in shown  # a short secret shows its length only


def test_check_config_cli(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "ari_push", "--config", str(write(tmp_path, GOOD)), "check-config"],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ari"]["app"] == "ari-push"
    assert "ari-pass-123" not in ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "-m", "ari_push", "--config",
                          str(write(tmp_path, GOOD + "[calls]\nmax_timeout=0\n")), "check-config"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert "calls.max_timeout: must be a positive number" in bad.stderr


def test_webpush_hosts_default_to_public_services_and_can_be_set(tmp_path: Path) -> None:
    from ari_push.contacts import DEFAULT_WEBPUSH_HOSTS, ContactPolicy

    default = load(write(tmp_path, GOOD), environ={})
    assert ContactPolicy.from_settings(default.capture).webpush_allowed_hosts == DEFAULT_WEBPUSH_HOSTS
    own = load(write(tmp_path, GOOD + "[capture]\nwebpush_allowed_hosts = ['push.example.org']\n"), environ={})
    assert ContactPolicy.from_settings(own.capture).webpush_allowed_hosts == ("push.example.org",)
    with pytest.raises(SettingsError) as err:
        load(write(tmp_path, GOOD + "[capture]\nwebpush_allowed_hosts = ['https://x/y']\n"), environ={})
    assert err.value.key == "capture.webpush_allowed_hosts"


@pytest.mark.parametrize(
    ("extra", "key", "why"),
    [
        ("[cluster]\nmode='broadcast'\n", "cluster.mode", "needs [redis]"),
        ("[redis]\nurl='redis://127.0.0.1:6379'\n[cluster]\nmode='broadcast'\n", "ari.app", "its own app"),
        ("[redis]\nurl='redis://127.0.0.1:6379'\n[cluster]\nmode='lease'\nheartbeat=5\nnode_ttl=2\n",
         "cluster.node_ttl", "longer than"),
        ("[cluster]\nmode='active'\n", "cluster.mode", "must be one of"),
    ],
)
def test_cluster_settings_are_validated(tmp_path: Path, extra: str, key: str, why: str) -> None:
    with pytest.raises(SettingsError) as err:
        load(write(tmp_path, GOOD + extra), environ={})
    assert err.value.key == key and why in str(err.value)


def test_broadcast_cluster_settings_load(tmp_path: Path) -> None:
    s = load(write(tmp_path, GOOD.replace("[ari]", "[ari]\napp='ari-push-pbx1'") +
                   "[redis]\nurl='redis://127.0.0.1:6379'\n[cluster]\nmode='broadcast'\n"), environ={})
    assert s.cluster.mode == "broadcast" and s.ari.app == "ari-push-pbx1"


def test_redis_wait_settings(tmp_path: Path) -> None:
    s = load(write(tmp_path, GOOD + "[redis]\nurl='redis://127.0.0.1:6379'\nwait_replicas=1\nwait_timeout=0.05\n"),
             environ={})
    assert (s.redis.wait_replicas, s.redis.wait_timeout) == (1, 0.05)
    for bad, key in (("wait_replicas=-1", "redis.wait_replicas"), ("wait_timeout=5", "redis.wait_timeout")):
        with pytest.raises(SettingsError) as err:
            load(write(tmp_path, GOOD + f"[redis]\nurl='redis://127.0.0.1:6379'\n{bad}\n"), environ={})
        assert err.value.key == key
