"""[freeswitch]: the event socket instead of [ari]/[ami]; every mistake names its key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ari_push.settings import Secret, SettingsError, load, to_display


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ari-push.toml"
    path.write_text(text)
    return path


def test_freeswitch_alone_is_a_complete_config(tmp_path: Path) -> None:
    (tmp_path / "esl.secret").write_text("esl-pass-789\n")
    s = load(write(tmp_path, '[freeswitch]\npassword_file = "esl.secret"\n'), environ={})
    fs = s.freeswitch
    assert fs is not None
    assert (fs.host, fs.port, fs.profile) == ("127.0.0.1", 8021, "internal")
    assert fs.password == "esl-pass-789" and isinstance(fs.password, Secret)
    assert "esl-pass-789" not in repr(s)
    assert to_display(s)["freeswitch"]["password"] != "esl-pass-789"


def test_asterisk_config_has_no_freeswitch(tmp_path: Path) -> None:
    s = load(write(tmp_path, '[ari]\npassword = "a"\n[ami]\nsecret = "b"\n'), environ={})
    assert s.freeswitch is None


def test_env_can_give_the_password(tmp_path: Path) -> None:
    s = load(write(tmp_path, "[freeswitch]\nport = 8022\n"), environ={"ARI_PUSH_FREESWITCH__PASSWORD": "x1"})
    assert s.freeswitch is not None and s.freeswitch.password == "x1" and s.freeswitch.port == 8022


@pytest.mark.parametrize("text, key, why", [
    ("[freeswitch]\n", "freeswitch.password", "is required"),
    ('[freeswitch]\npassword = "a b"\n', "freeswitch.password", "spaces"),
    ('[freeswitch]\npassword = "p"\nport = 0\n', "freeswitch.port", "TCP port"),
    ('[freeswitch]\npassword = "p"\nport = "8021"\n', "freeswitch.port", "an integer"),
    ('[freeswitch]\npassword = "p"\nprofile = "internal reg"\n', "freeswitch.profile", "sofia profile"),
    ('[freeswitch]\npassword = "p"\nhost = ""\n', "freeswitch.host", "host name"),
    ('[freeswitch]\npassword = "p"\nheartbeat = 0\n', "freeswitch.heartbeat", "positive"),
    ('[freeswitch]\npassword = "p"\npasword = "typo"\n', "freeswitch.pasword", "unknown key"),
    ('[freeswitch]\npassword = "p"\npassword_file = "f"\n', "freeswitch.password", "not both"),
    ('[freeswitch]\npassword_file = "missing.secret"\n', "freeswitch.password_file", "cannot read"),
    ('[freeswitch]\npassword = "p"\n[ari]\npassword = "a"\n', "ari", "one PBX"),
    ('[freeswitch]\npassword = "p"\n[ami]\nsecret = "a"\n', "ami", "one PBX"),
    ("freeswitch = 3\n", "freeswitch", "must be a table"),
])
def test_bad_freeswitch_settings_name_the_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    with pytest.raises(SettingsError) as exc:
        load(write(tmp_path, text), environ={})
    assert exc.value.key == key and why in exc.value.why


def test_check_config_validates_and_masks_the_esl_password(tmp_path: Path) -> None:
    path = write(tmp_path, '[freeswitch]\npassword = "esl-secret-42"\nprofile = "external"\n')
    proc = subprocess.run([sys.executable, "-m", "ari_push", "-c", str(path), "check-config"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["freeswitch"]["profile"] == "external"
    assert "esl-secret-42" not in proc.stdout + proc.stderr
    bad = write(tmp_path, '[freeswitch]\npassword = "esl-secret-42"\nport = 99999\n')
    proc = subprocess.run([sys.executable, "-m", "ari_push", "-c", str(bad), "check-config"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "freeswitch.port" in proc.stderr
    assert "esl-secret-42" not in proc.stdout + proc.stderr


def test_rig_variables_in_the_environment_are_not_settings(tmp_path: Path) -> None:
    env = {"ARI_PUSH_RIG_SLOT": "4", "ARI_PUSH_FREESWITCH_SOURCES": "/srv/fs", "ARI_PUSH_FREESWITCH_BUILD": "1",
           "ARI_PUSH_FREESWITCH__PORT": "8022"}
    s = load(write(tmp_path, '[freeswitch]\npassword = "p"\n'), environ=env)
    assert s.freeswitch is not None and s.freeswitch.port == 8022


def test_cluster_on_freeswitch_is_broadcast_with_redis(tmp_path: Path) -> None:
    """Every daemon on one FreeSWITCH sees each parked call: broadcast (Redis claims) needs no
    per-daemon [ari] app; lease mode (one app connected at a time) does not apply and is refused."""
    base = '[freeswitch]\npassword = "p"\n[redis]\nurl = "redis://127.0.0.1:6379/0"\n'
    s = load(write(tmp_path, base + '[cluster]\nmode = "broadcast"\n'), environ={})
    assert s.cluster.mode == "broadcast" and s.freeswitch is not None
    with pytest.raises(SettingsError) as exc:
        load(write(tmp_path, base + '[cluster]\nmode = "lease"\n'), environ={})
    assert exc.value.key == "cluster.mode" and "broadcast" in exc.value.why
    with pytest.raises(SettingsError) as exc:
        load(write(tmp_path, '[freeswitch]\npassword = "p"\n[cluster]\nmode = "broadcast"\n'), environ={})
    assert exc.value.key == "cluster.mode" and "needs [redis]" in exc.value.why
