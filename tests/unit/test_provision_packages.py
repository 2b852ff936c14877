"""rig/provision.py's Debian packages: what a fresh machine gets, and nothing done on a warm one.

apt itself is replaced here (the step it runs is recorded instead): the point is which packages
the rig asks for and when, not apt.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rig import provision


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[list[str]]:
    runs: list[list[str]] = []
    monkeypatch.setattr(provision, "_run", lambda cmd, **kw: runs.append(list(cmd)))
    monkeypatch.setattr(provision.os, "geteuid", lambda: 0)
    monkeypatch.setenv("ARI_PUSH_CACHE", str(tmp_path))
    return runs


def test_the_real_sip_client_is_one_of_the_rig_packages() -> None:
    assert provision.APT_PACKAGES["linphonec"] == "linphone-cli"


def test_a_fresh_machine_installs_every_missing_package_in_one_apt_run(
        recorded: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provision.shutil, "which", lambda name: None)
    provision.ensure_packages()
    assert recorded[0][:2] == ["apt-get", "update"]
    install = recorded[1]
    assert install[-len(provision.APT_PACKAGES):] == sorted(set(provision.APT_PACKAGES.values()))
    assert "linphone-cli" in install and "--no-install-recommends" in install
    assert len(recorded) == 2


def test_only_the_missing_package_is_installed(recorded: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provision.shutil, "which", lambda name: None if name == "linphonec" else f"/usr/bin/{name}")
    provision.ensure_packages()
    assert recorded[1][-1] == "linphone-cli"
    assert recorded[1].count("sip-tester") == 0


def test_a_warm_machine_runs_nothing(recorded: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provision.shutil, "which", lambda name: f"/usr/bin/{name}")
    provision.ensure_packages()
    assert recorded == []


def test_missing_packages_without_root_is_a_clear_error(
        recorded: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provision.shutil, "which", lambda name: None if name == "linphonec" else f"/usr/bin/{name}")
    monkeypatch.setattr(provision.os, "geteuid", lambda: 1000)
    with pytest.raises(provision.ProvisionError, match="apt-get install linphone-cli"):
        provision.ensure_packages()
    assert recorded == []
