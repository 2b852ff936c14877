"""[refresh] and [mwi] settings: defaults, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ari_push.settings import SettingsError, load

BASE = '[ari]\npassword = "p"\n[ami]\nsecret = "s"\n'


def cfg(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ari-push.toml"
    path.write_text(BASE + text)
    return path


def test_defaults(tmp_path: Path) -> None:
    s = load(cfg(tmp_path, ""), environ={})
    assert s.refresh.enabled and s.refresh.at_fraction == 0.8 and s.refresh.min_interval == 600.0
    assert s.refresh.disabled_providers == ("vendor",)  # a vendor URL is a call hook: off unless asked
    assert not s.mwi.enabled and s.mwi.min_interval == 30.0 and s.mwi.mailboxes == ()  # opt-in: AMI call events
    assert s.mwi.disabled_providers == ("vendor",)
    assert s.messages.enabled and s.messages.ttl == 3600.0 and not s.messages.preview  # no text in pushes


def test_vendor_urls_can_be_switched_on(tmp_path: Path) -> None:
    s = load(cfg(tmp_path, "[refresh]\ndisabled_providers = []\n[mwi]\ndisabled_providers = []\n"), environ={})
    assert s.refresh.disabled_providers == () and s.mwi.disabled_providers == ()


def test_values_and_env(tmp_path: Path) -> None:
    s = load(cfg(tmp_path, '[refresh]\nat_fraction = 0.5\ndisabled_providers = ["APNS"]\n'
                           '[mwi]\nmin_interval = 5\n[mwi.mailboxes]\n"100@default" = ["1001", "1002"]\n'),
             environ={"ARI_PUSH_REFRESH__MIN_INTERVAL": "120"})
    assert s.refresh.at_fraction == 0.5 and s.refresh.disabled_providers == ("apns",)
    assert s.refresh.min_interval == 120.0
    assert s.mwi.mailboxes == (("100@default", ("1001", "1002")),)


@pytest.mark.parametrize(("text", "key", "why"), [
    ("[refresh]\nat_fraction = 1.0\n", "refresh.at_fraction", "below 1"),
    ("[refresh]\nat_fraction = 0\n", "refresh.at_fraction", "positive"),
    ('[refresh]\ndisabled_providers = ["pigeon"]\n', "refresh.disabled_providers", "unknown provider"),
    ("[refresh]\ntick = 30\n", "refresh.tick", "at most 10"),
    ("[refresh]\nevery = 3\n", "refresh.every", "unknown key"),
    ('[mwi.mailboxes]\n"100" = ["1001"]\n', "mwi.mailboxes.100", "box@context"),
    ('[mwi.mailboxes]\n"100@default" = []\n', "mwi.mailboxes.100@default", "non-empty list"),
    ('[mwi]\nmailboxes = "100@default"\n', "mwi.mailboxes", "must be a table"),
    ("[mwi]\nmin_interval = -1\n", "mwi.min_interval", "positive"),
    ("[messages]\npoll = 30\n", "messages.poll", "at most 10"),
    ("[messages]\nttl = 0\n", "messages.ttl", "positive"),
    ('[messages]\npreview = "yes"\n', "messages.preview", "true or false"),
    ('[mwi]\ndisabled_providers = ["carrier-pigeon"]\n', "mwi.disabled_providers", "unknown provider"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    with pytest.raises(SettingsError) as err:
        load(cfg(tmp_path, text), environ={})
    assert err.value.key == key and why in err.value.why


def test_the_rig_slot_variable_is_not_a_setting(tmp_path: Path) -> None:
    # every test command exports ARI_PUSH_RIG_SLOT; daemons started from such a shell must start
    s = load(cfg(tmp_path, ""), environ={"ARI_PUSH_RIG_SLOT": "5"})
    assert s.refresh.enabled
