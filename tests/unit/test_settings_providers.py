"""[[hms]], [[hmos]], [webpush], [[plugin]] and [[fcm]] sender_id: validation, `check-config`, and
`inspect-contact` saying which table serves a contact or why none does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ari_push.push.factory import build_providers
from ari_push.push.huawei import HmosProvider, HmsProvider
from ari_push.push.webpush import WebPushProvider
from ari_push.settings import SettingsError, load, to_display
from tests.fakes.hms import FakeHuawei
from tests.fakes.keys import ec_key, make_pki, private_pem, service_account

BASE = '[ari]\npassword = "ari-pass-123"\n[ami]\nsecret = "ami-secret-456"\n'
HMS_SECRET = "hms-client-secret-789"
HMS = f'[[hms]]\napp_id = "101234567"\nclient_secret = "{HMS_SECRET}"\n'
HMS_TOKEN = "IQAAAACy0aUZAABfs3CF9QLKJ3l5mGJ6IH3eSoEsSGodcr0xw0_TwDbQ7rd"
LAB = "sip:1001@192.0.2.10:5060"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ari-push.toml"
    path.write_text(BASE + text)
    return path


@pytest.fixture(scope="module")
def hmos_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fake = FakeHuawei(make_pki(tmp_path_factory.mktemp("pki")))
    path = tmp_path_factory.mktemp("hmos") / "sa.json"
    path.write_text(fake.add_project("388421841221234567").json())
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARI_PUSH_")}
    return subprocess.run([sys.executable, "-m", "ari_push", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


# ---------------------------------------------------------------- settings


def test_hms_hmos_webpush_tables_load_and_build(tmp_path: Path, hmos_key_file: Path) -> None:
    (tmp_path / "vapid.pem").write_text(private_pem(ec_key()))
    text = (HMS + f'[[hmos]]\nproject_id = "388421841221234567"\nservice_account_file = "{hmos_key_file}"\n'
            'call_push_type = 6\n[webpush]\nvapid_key_file = "vapid.pem"\nsubject = "mailto:ops@example.com"\n')
    s = load(write(tmp_path, text), environ={})
    assert s.hms[0].client_id == "101234567"  # defaults to the app id
    assert s.hms[0].token_url == "https://oauth-login.cloud.huawei.com/oauth2/v3/token"
    assert s.hmos[0].call_push_type == 6 and s.webpush.subject == "mailto:ops@example.com"
    providers = build_providers(s)
    assert [type(p) for p in providers] == [HmsProvider, HmosProvider, WebPushProvider]
    shown = json.dumps(to_display(s))
    assert HMS_SECRET not in shown and "PRIVATE KEY" not in shown


@pytest.mark.parametrize(("text", "key", "why"), [
    ('[[hms]]\nclient_secret = "x"\n', "hms[0].app_id", "is required"),
    ('[[hms]]\napp_id = "com.example"\nclient_secret = "x"\n', "hms[0].app_id", "digits only"),
    ('[[hms]]\napp_id = "1"\n', "hms[0].client_secret", "is required"),
    ('[[hms]]\napp_id = "1"\nclient_secret = "x"\napi_url = "http://push-api.cloud.huawei.com"\n',
     "hms[0].api_url", "https://"),
    ('[[hms]]\napp_id = "1"\nclient_secret = "x"\ntoken_url = "http://127.0.0.1/t"\n', "hms[0].token_url",
     "https://"),
    ('[[hms]]\napp_id = "1"\nclient_secret = "x"\nsecret = "y"\n', "hms[0].secret", "unknown key"),
    ('[[hms]]\napp_id = "1"\nclient_secret = "x"\n[[hms]]\napp_id = "1"\nclient_secret = "y"\n', "hms",
     "twice"),
    ('[[hmos]]\nproject_id = "1"\nservice_account = "{}"\ncall_push_type = 0\n', "hmos[0].call_push_type",
     "10 (in-app call) or 6"),
    ('[[hmos]]\nproject_id = "1"\nservice_account = "{}"\njwt_lifetime = 7200\n', "hmos[0].jwt_lifetime",
     "3600"),
    ('[[hmos]]\nproject_id = "1"\n', "hmos[0].service_account", "is required"),
    ('[webpush]\nvapid_key = "k"\n', "webpush.subject", "mailto:"),
    ('[webpush]\nsubject = "mailto:a@b.c"\n', "webpush.vapid_key", "is required"),
    ('[webpush]\nvapid_key = "k"\nsubject = "mailto:a@b.c"\njwt_lifetime = 90000\n', "webpush.jwt_lifetime",
     "24 hours"),
    ('[webpush]\nvapid_key = "k"\nsubject = "mailto:a@b.c"\nmax_payload = 5000\n', "webpush.max_payload",
     "4096"),
    ('[[fcm]]\nproject_id = "p"\nservice_account = "{}"\nsender_id = "proj"\n', "fcm[0].sender_id",
     "project number"),
    ('[[plugin]]\nname = "no-such-plugin"\n', "plugin[0].name", "no installed plug-in"),
    ('[[plugin]]\nurl = "x"\n', "plugin[0].name", "is required"),
])
def test_bad_tables_name_the_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(write(tmp_path, text), environ={})
    assert info.value.key == key and why in info.value.why, str(info.value)


def test_check_config_builds_providers_and_reports_bad_keys(tmp_path: Path) -> None:
    ok = cli(write(tmp_path, HMS), "check-config")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["hms"][0]["app_id"] == "101234567" and HMS_SECRET not in ok.stdout
    bad_key = "-----BEGIN PRIVATE KEY-----\\nTOPSECRETKEYBYTES\\n-----END PRIVATE KEY-----"
    bad = cli(write(tmp_path, f'[webpush]\nvapid_key = "{bad_key}"\nsubject = "mailto:a@b.c"\n'), "check-config")
    assert bad.returncode == 2 and "webpush.vapid_key: is not a PEM private key" in bad.stderr
    assert "TOPSECRETKEYBYTES" not in bad.stdout + bad.stderr
    sa = json.dumps({"key_id": "k", "sub_account": "s", "private_key": "nope"}).replace('"', '\\"')
    bad_sa = cli(write(tmp_path, f'[[hmos]]\nproject_id = "1"\nservice_account = "{sa}"\n'), "check-config")
    assert bad_sa.returncode == 2 and "hmos[1].service_account: private_key is not a PEM" in bad_sa.stderr


# ---------------------------------------------------------------- inspect-contact: who serves it


def inspect(config: Path, params: str) -> dict[str, str]:
    result = cli(config, "inspect-contact", f"{LAB};{params}")
    assert result.returncode == 0, result.stdout + result.stderr
    served: dict[str, str] = json.loads(result.stdout)["served_by"]
    return served


def test_inspect_contact_names_the_huawei_table(tmp_path: Path, hmos_key_file: Path) -> None:
    config = write(tmp_path, HMS + f'[[hmos]]\nproject_id = "388421841221234567"\n'
                                   f'service_account_file = "{hmos_key_file}"\n')
    assert inspect(config, f"pn-provider=hms;pn-prid={HMS_TOKEN};pn-param=101234567") == \
        {"table": "hms[0]", "why": "app_id 101234567"}
    assert inspect(config, f"pn-provider=hmos;pn-prid={HMS_TOKEN};pn-param=388421841221234567") == \
        {"table": "hmos[0]", "why": "project_id 388421841221234567"}
    assert inspect(config, f"pn-provider=hms;pn-prid={HMS_TOKEN};pn-param=109999999") == \
        {"table": "", "why": "no [[hms]] table has app_id 109999999"}


def test_inspect_contact_webpush_with_and_without_keys(tmp_path: Path) -> None:
    (tmp_path / "vapid.pem").write_text(private_pem(ec_key()))
    endpoint = "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABk"
    keys = ("pn-p256dh=BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4;"
            "pn-auth=BTBZMqHH6r4Tts7J_aSIgg")
    none = write(tmp_path, "")
    assert inspect(none, f"pn-provider=webpush;pn-prid={endpoint}")["why"].startswith("[webpush] has no vapid_key")
    config = write(tmp_path, '[webpush]\nvapid_key_file = "vapid.pem"\nsubject = "mailto:ops@example.com"\n')
    assert inspect(config, f"pn-provider=webpush;pn-prid={endpoint};{keys}") == \
        {"table": "[webpush]", "why": "encrypted payload (RFC 8291)"}
    assert inspect(config, f"pn-provider=webpush;pn-prid={endpoint}")["why"].startswith("empty wake-up push")
    shown = cli(config, "inspect-contact", f"{LAB};pn-provider=webpush;pn-prid={endpoint};{keys}").stdout
    assert "BTBZMqHH6r4Tts7J_aSIgg" not in shown  # the auth secret is masked like a token


def test_legacy_linphone_sender_id_app_id(tmp_path: Path) -> None:
    """pn-type=firebase;app-id=<sender id>: served once [[fcm]] names its sender_id, explained before."""
    sa = tmp_path / "sa.json"
    sa.write_text(service_account("softphone-prod").json("https://oauth2.googleapis.com/token"))
    legacy = "pn-type=firebase;pn-tok=dQw4w9WgXcQ:APA91bH-abc_DEF123;app-id=929724111839"
    two = (f'[[fcm]]\nproject_id = "softphone-prod"\nservice_account_file = "{sa}"\n'
           f'[[fcm]]\nproject_id = "other"\nservice_account_file = "{sa}"\n')
    before = inspect(write(tmp_path, two), legacy)
    assert before["table"] == "" and 'sender_id = "929724111839"' in before["why"]
    with_sender = two.replace('project_id = "softphone-prod"\n', 'project_id = "softphone-prod"\n'
                              'sender_id = "929724111839"\n')
    assert inspect(write(tmp_path, with_sender), legacy) == {
        "table": "fcm[0]", "why": "sender_id 929724111839 of project softphone-prod (legacy app-id)"}
    assert inspect(write(tmp_path, with_sender), "pn-provider=fcm;pn-prid=dQw4w9WgXcQ:APA91bH-abc_DEF123;"
                                                 "pn-param=other")["table"] == "fcm[1]"
