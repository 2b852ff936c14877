"""asterisk-conf/ari-push.toml and asterisk-conf/ari-push.service: the sample daemon config is
accepted by `ari-push check-config` and builds its providers, and the systemd unit provides
exactly the credential files the config reads.

The sample reads its secrets from systemd's credentials directory; here that directory is a
temp directory holding freshly made credentials (real keys, so the providers parse them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ari_push.push.factory import build_providers
from ari_push.settings import load
from tests.fakes.keys import ec_key, private_pem, service_account

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "asterisk-conf" / "ari-push.toml"
UNIT = REPO / "asterisk-conf" / "ari-push.service"
CREDENTIALS = "/run/credentials/ari-push.service/"
SECRETS = {"ari-password": "sample-ari-secret-1", "ami-secret": "sample-ami-secret-2",
           "redis-password": "sample-redis-secret-3"}


def credential_names(text: str) -> set[str]:
    """Credential files the active (uncommented) lines of the sample read."""
    active = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return set(re.findall(re.escape(CREDENTIALS) + r"([\w.-]+)", active))


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """The sample as installed, with its credentials directory at tmp_path/credentials."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    for name, value in SECRETS.items():
        (creds / name).write_text(value + "\n")
    (creds / "apns-softphone.p8").write_text(private_pem(ec_key()))
    (creds / "fcm-softphone-prod.json").write_text(
        service_account("softphone-prod").json("https://oauth2.googleapis.com/token"))
    config = tmp_path / "ari-push.toml"
    config.write_text(SAMPLE.read_text().replace(CREDENTIALS, f"{creds}/"))
    return config


def test_check_config_accepts_the_sample(installed: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARI_PUSH_")}
    result = subprocess.run([sys.executable, "-m", "ari_push", "--config", str(installed), "check-config"],
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stderr
    shown = json.loads(result.stdout)
    assert shown["redis"]["url"] == "redis://127.0.0.1:6379/0" and shown["push"]["rate_per_minute"] == 10.0
    assert shown["push"]["burst"] == 5 and shown["push"]["allow_plain_http"] is False
    assert shown["log"]["format"] == "json" and shown["http"]["listen"] == "127.0.0.1:9387"
    for secret in SECRETS.values():
        assert secret not in result.stdout and secret not in result.stderr


def test_the_sample_builds_its_providers(installed: Path) -> None:
    settings = load(installed, environ={})
    assert settings.ari.password == SECRETS["ari-password"] and settings.redis.password == SECRETS["redis-password"]
    names = sorted(type(p).__name__ for p in build_providers(settings))
    assert names == ["ApnsProvider", "FcmProvider"]  # vendor URLs stay off until hosts are allowed
    assert settings.shutdown_timeout == 10 and settings.node_id == "pbx1-ari-push"


def unit_file() -> dict[str, dict[str, str]]:
    """Section -> key -> value; systemd allows repeated keys (LoadCredential=): one per line."""
    values: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            values.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        values[section].setdefault(key, []).append(value)
    return {sec: {k: "\n".join(v) for k, v in kv.items()} for sec, kv in values.items()}


def test_the_unit_loads_every_credential_the_sample_reads_and_is_hardened() -> None:
    service = unit_file()["Service"]
    loaded = {line.split(":", 1)[0] for line in service["LoadCredential"].splitlines()}
    assert loaded == credential_names(SAMPLE.read_text())
    assert all(src.split(":", 1)[1].startswith("/etc/ari-push/secrets/")
               for src in service["LoadCredential"].splitlines())
    assert service["ExecStart"].endswith("--config /etc/ari-push/ari-push.toml run")
    assert service["Type"] == "simple" and service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # EXIT_CONFIG: a bad config does not loop
    assert int(service["TimeoutStopSec"]) > 10 + 5  # shutdown_timeout plus closing the links
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "User": "ari-push"}.items():
        assert service[key] == value, key
    assert service["MemoryMax"].endswith("M")


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze (package systemd) is needed to check the unit"
    unit = tmp_path / "ari-push.service"  # ExecStart must exist for verify: point it at this venv
    unit.write_text(UNIT.read_text().replace("/opt/ari-push/bin/ari-push", str(Path(sys.executable).parent /
                                                                             "ari-push")))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0 and "Unknown" not in result.stderr, result.stderr
    security = subprocess.run([analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True,
                              timeout=30, check=False)
    exposure = re.search(r"Overall exposure level for ari-push.service: ([\d.]+)", security.stdout)
    assert exposure is not None, security.stdout[-500:]
    assert float(exposure.group(1)) <= 2.0  # systemd rates <= 2.0 as "OK"
