"""Issue 16 (hardening), the findings that need no network: each test failed on the code before
the fix. Findings 1 (device cap), 2 (masking), 3 (settings errors), 4 (check-config = run),
7 (health server), 8 (store times, terminal escapes), 9 (AMI framing), 10 (NAT64/6to4), 11
(provider URLs). The HTTP findings are in tests/unit/push/test_hardening_http.py, the Redis
side in tests/integration/test_hardening_redis.py."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ari_push.ami_frames import AmiParser
from ari_push.bindings import MemoryStore
from ari_push.capture import Capture
from ari_push.cli import binding_view
from ari_push.contacts import ContactPolicy, ContactRejected, parse_contact
from ari_push.health import HealthServer
from ari_push.links import LinkState
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushOutcome, PushParams, mask
from ari_push.netaddr import is_public
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.vendor import UrlRefused, VendorProvider, check_url
from ari_push.settings import Settings, SettingsError, VendorSettings, load
from ari_push.wakeups import WakeupHub
from tests.fakes.builders import message
from tests.fakes.keys import ec_key, private_pem, service_account

VOIP = "a1b2c3d4" * 8
REMOTE = "e5f6a7b8" * 8
DUAL = (f"sip:1001@192.0.2.1:5060;pn-provider=apns;pn-prid={VOIP}:voip&{REMOTE}:remote;"
        "pn-param=ABCD1234.com.example.app.voip&remote")
# RFC 8599 and legacy Linphone parameters together, the legacy token in upper case (they agree)
LEGACY_UPPER = (f"sip:1001@192.0.2.1;pn-provider=apns;pn-prid={VOIP};pn-param=ABCD1234.com.example.app.voip;"
                f"pn-type=apple;pn-tok={VOIP.upper()};app-id=com.example.app.voip")
VENDOR_SECRET = "zp-7f3a9c2b1e0d4f5a-device-secret"
VENDOR_URI = f"sip:1001@192.0.2.1;X-PUSH-URI=https://push.zoiper.example/p/{VENDOR_SECRET}?k=abcdef123456"
PASSWORD10 = "ac12345ce0"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ari_push", *args], capture_output=True, text=True, timeout=60,
                          check=False, env=env)


async def _ignore(*_: object) -> None:
    return None


def windows(secret: str, size: int = 8) -> set[str]:
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def assert_hidden(text: str, *secrets: str) -> None:
    """No 8-character piece of any secret in ``text`` (4 leading characters may show)."""
    for secret in secrets:
        leaks = [w for w in windows(secret) if w in text or w.lower() in text.lower()]
        assert not leaks, f"{secret[:4]}... leaks {leaks[:3]} in {text[:300]!r}"


# ---------------------------------------------------------------- 1. one account can freeze the daemon


async def test_capture_keeps_at_most_max_devices_per_aor_least_recently_seen_goes() -> None:
    store, metrics = MemoryStore(), Metrics()
    policy = ContactPolicy(vendor_allowed_hosts=("push.zoiper.example",))
    clock = iter(range(1_700_000_000, 1_800_000_000))
    capture = Capture(store, WakeupHub(), policy, ami=None, metrics=metrics,  # type: ignore[arg-type]
                      clock=lambda: float(next(clock)))
    for i in range(50):  # a fresh push URL with every REGISTER: a new device each time
        await capture.capture("1001", "1001", f"sip:1001@192.0.2.1;X-PUSH-URI=https://push.zoiper.example/p/{i}",
                              "Zoiper")
    kept = await store.bindings_for("1001")
    assert policy.max_devices_per_aor == 10 == len(kept)
    assert {b.push.token.rsplit("/", 1)[1] for b in kept} == {str(i) for i in range(40, 50)}
    assert metrics.devices_evicted._value.get() == 40


def test_max_devices_per_aor_is_a_setting(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[ari]\npassword="p"\n[ami]\nsecret="s"\n[capture]\nmax_devices_per_aor = 3\n')
    assert ContactPolicy.from_settings(load(cfg, environ={}).capture).max_devices_per_aor == 3
    cfg.write_text('[ari]\npassword="p"\n[ami]\nsecret="s"\n[capture]\nmax_devices_per_aor = 0\n')
    with pytest.raises(SettingsError, match=r"capture\.max_devices_per_aor"):
        load(cfg, environ={})


# ---------------------------------------------------------------- 2. masking leaks


def test_mask_shows_nothing_of_a_short_secret() -> None:
    assert mask(PASSWORD10) == "…(10)"
    assert mask(VOIP) == "a1b2…(64)"


def test_inspect_contact_masks_both_halves_every_case_and_vendor_paths() -> None:
    dual = cli("inspect-contact", DUAL)
    assert dual.returncode == 0, dual.stderr
    assert_hidden(dual.stdout, VOIP, REMOTE)
    assert ":voip&" in dual.stdout and ":remote" in dual.stdout  # the shape is still readable
    legacy = cli("inspect-contact", LEGACY_UPPER)
    assert legacy.returncode == 0, legacy.stderr
    assert_hidden(legacy.stdout, VOIP)
    revealed = cli("inspect-contact", "--reveal", DUAL)
    assert VOIP in revealed.stdout and REMOTE in revealed.stdout


def test_every_output_path_hides_tokens_vendor_secrets_and_passwords(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """CLI views, check-config, settings errors and the capture log, grepped for the raw values."""
    outputs: list[str] = []
    policy = ContactPolicy(vendor_allowed_hosts=("push.zoiper.example",))
    for uri in (DUAL, LEGACY_UPPER, VENDOR_URI):
        push = parse_contact(uri, policy)
        assert push is not None
        outputs.append(json.dumps(binding_view(Binding("1001", "1001", push, uri, "UA"), reveal=False),
                                  ensure_ascii=False))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[ari]\npassword="{PASSWORD10}"\n[ami]\nsecret="{VOIP}"\n'
                   f'[capture]\nvendor_allowed_hosts=["push.zoiper.example"]\n')
    shown = cli("-c", str(cfg), "check-config")
    assert shown.returncode == 0, shown.stderr
    outputs += [shown.stdout, shown.stderr]
    assert json.loads(shown.stdout)["ari"]["password"] == "…(10)"  # nothing but its length
    store = MemoryStore()
    capture = Capture(store, WakeupHub(), policy, ami=None, metrics=Metrics())  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG):
        for uri in (DUAL, LEGACY_UPPER, VENDOR_URI):
            asyncio.run(capture.capture("1001", "1001", uri, "UA"))
        # the dispatcher's failure lines and the vendor provider's refusal line
        vendor_push = parse_contact(VENDOR_URI, policy)
        assert vendor_push is not None
        dispatcher = PushDispatcher([VendorProvider(VendorSettings(), ("other.example",))], _ignore)
        result = asyncio.run(dispatcher.send(Binding("1001", "1001", vendor_push, VENDOR_URI), message()))
        assert result.outcome is PushOutcome.FAILED
    assert "vendor push to push.zoiper.example refused" in caplog.text
    outputs.append(caplog.text)
    text = "\n".join(outputs)
    assert_hidden(text, VOIP, REMOTE, VENDOR_SECRET, "abcdef123456")
    assert PASSWORD10 not in text and "ac…" not in text and "…ce" not in text


# ---------------------------------------------------------------- 3. a config error prints the secret


@pytest.mark.parametrize("line", ["password = 12345678", "password = 12345678.5", "password = [12345678]"])
def test_a_secret_of_the_wrong_type_is_named_not_shown(tmp_path: Path, line: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[ari]\n{line}\n[ami]\nsecret="s"\n')
    with pytest.raises(SettingsError) as err:
        load(cfg, environ={})
    assert err.value.key == "ari.password" and "12345678" not in str(err.value)
    out = cli("-c", str(cfg), "check-config")
    assert out.returncode == 2 and "12345678" not in out.stdout + out.stderr


def test_a_numeric_secret_from_the_environment_is_text(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[ami]\nsecret="s"\n')
    s = load(cfg, environ={"ARI_PUSH_ARI__PASSWORD": "12345678", "ARI_PUSH_AMI__SECRET": "0042"})
    assert s.ari.password == "12345678" and s.ami.secret == "0042"


def test_ari_url_credentials_are_taken_out_and_never_shown(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[ari]\nurl = "http://asterisk:s3cr3t-pw-xyz@127.0.0.1:8088"\n[ami]\nsecret="s"\n')
    s = load(cfg, environ={})
    assert s.ari.url == "http://127.0.0.1:8088"
    assert (s.ari.username, s.ari.password) == ("asterisk", "s3cr3t-pw-xyz")
    out = cli("-c", str(cfg), "check-config")
    assert out.returncode == 0, out.stderr
    assert "s3cr3t" not in out.stdout + out.stderr
    cfg.write_text('[ari]\nurl = "http://u:s3cr3t-pw-xyz@[::1"\n[ami]\nsecret="s"\n')
    bad = cli("-c", str(cfg), "check-config")
    assert bad.returncode == 2 and "s3cr3t" not in bad.stdout + bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("section", ["webhook", "fcm"])
def test_credentials_in_a_provider_url_are_refused_without_showing_them(tmp_path: Path, section: str) -> None:
    cfg = tmp_path / "c.toml"
    key = "url" if section == "webhook" else "api_url"
    head = "[webhook]\n" if section == "webhook" else "[[fcm]]\nproject_id='p'\nservice_account='{}'\n"
    cfg.write_text(f'[ari]\npassword="p"\n[ami]\nsecret="s"\n{head}{key} = "https://me:hunter2-pw@relay.example/x"\n'
                   + ('secret="k"\nproviders=["fcm"]\n' if section == "webhook" else ""))
    with pytest.raises(SettingsError) as err:
        load(cfg, environ={})
    assert "hunter2" not in str(err.value) and "credentials" in str(err.value)


# ---------------------------------------------------------------- 4. check-config says OK, run crashes


def _broken_sa() -> str:
    data = json.loads(service_account("proj-x").json("https://oauth2.googleapis.com/token"))
    data["private_key"] = "-----BEGIN PRIVATE KEY-----\nAAAAbroken\n-----END PRIVATE KEY-----\n"
    return json.dumps(data)


def _case_config(tmp_path: Path, case: str) -> Path:
    base = '[ari]\npassword="p"\n[ami]\nsecret="s"\n'
    if case == "fcm-broken-key":
        (tmp_path / "sa.json").write_text(_broken_sa())
        body = "[[fcm]]\nproject_id='proj-x'\nservice_account_file='sa.json'\n"
    elif case == "apns-bad-key":
        (tmp_path / "key.p8").write_text(private_pem(ec_key()).replace("M", "#", 3))
        body = "[[apns]]\ntopics=['com.example.voip']\nteam_id='T'\nkey_id='K'\nkey_file='key.p8'\n"
    elif case == "vendor-star":
        body = '[capture]\nvendor_allowed_hosts = ["*"]\n'
    elif case == "wildcard-tld":
        body = '[capture]\nvendor_allowed_hosts = ["*.com"]\n'
    elif case == "response-inf":
        body = "[vendor]\nmax_response_bytes = inf\n"
    elif case == "timeout-inf":
        body = "[vendor]\ntimeout = inf\n"
    elif case == "secret-not-utf8":
        (tmp_path / "ami.secret").write_bytes(b"\xff\xfe\x00secret")
        base = '[ari]\npassword="p"\n[ami]\nsecret_file="ami.secret"\n'
        body = ""
    elif case == "redis-url-unclosed":
        body = '[redis]\nurl = "redis://user:pw-0123456789@[::1"\n'
    else:
        raise AssertionError(case)
    cfg = tmp_path / "c.toml"
    cfg.write_text(base + body)
    return cfg


CASES = ["fcm-broken-key", "apns-bad-key", "vendor-star", "wildcard-tld", "response-inf", "timeout-inf",
         "secret-not-utf8", "redis-url-unclosed"]


@pytest.mark.parametrize("case", CASES)
def test_check_config_refuses_what_run_refuses_with_exit_2_and_one_line(tmp_path: Path, case: str) -> None:
    cfg = _case_config(tmp_path, case)
    checked = cli("-c", str(cfg), "check-config")
    assert checked.returncode == 2, (case, checked.stdout, checked.stderr)
    lines = checked.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ari-push: configuration error: "), checked.stderr
    assert "pw-0123456789" not in checked.stderr
    ran = cli("-c", str(cfg), "run")  # fails before connecting to anything
    assert ran.returncode == 2, (case, ran.stderr[-500:])
    assert ran.stderr.strip().splitlines()[-1] == lines[0] and "Traceback" not in ran.stderr


def test_check_config_output_ends_with_a_newline(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[ari]\npassword="p"\n[ami]\nsecret="s"\n')
    out = cli("-c", str(cfg), "check-config")
    assert out.returncode == 0 and out.stdout.endswith("}\n")


# ---------------------------------------------------------------- 7. health server


def test_health_default_port_collides_with_nothing_asterisk_uses() -> None:
    asterisk_ports = {5038, 8088, 8089, 5060, 5061, 4569, 2000, 2427, 2727, 1720, 4520, 5000}
    assert int(Settings().http.listen.rpartition(":")[2]) not in asterisk_ports


async def _health(**kw: object) -> HealthServer:
    server = HealthServer("127.0.0.1:0", [LinkState("ami")], Metrics(), **kw)  # type: ignore[arg-type]
    await server.start()
    return server


async def test_health_closes_a_connection_whose_request_head_does_not_arrive() -> None:
    server = await _health(header_timeout=0.5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        await writer.drain()
        closed = await asyncio.wait_for(reader.read(), 30)
        assert closed == b""  # closed unanswered, long before the 30 s bound
        writer.close()
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", server.port)
        writer2.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader2.read(), 30)
        assert answer.startswith(b"HTTP/1.1 200") and b'{"status": "ok"}' in answer
        writer2.close()
    finally:
        await server.stop()


async def test_health_caps_connections() -> None:
    server = await _health(header_timeout=60, max_connections=4)
    held = []
    try:
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /readyz HTTP/1.1\r\n")  # half a request: held open
            held.append((reader, writer))
        for _ in range(200):
            if server.open_connections == 4:
                break
            await asyncio.sleep(0.01)
        assert server.open_connections == 4
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 30) == b""  # refused while 4 are open
        writer.close()
        assert server.refused_connections == 1
    finally:
        for _, w in held:
            w.close()
        await server.stop()


async def test_health_warns_when_bound_beyond_loopback(caplog: pytest.LogCaptureFixture) -> None:
    server = HealthServer("0.0.0.0:0", [], Metrics())
    with caplog.at_level(logging.WARNING, "ari_push.health"):
        await server.start()
    await server.stop()
    assert "not authenticated" in caplog.text


# ---------------------------------------------------------------- 8. store times and terminal escapes


def _binding(last_seen: float, uri: str = "sip:1001@192.0.2.1;pn-tok=x") -> Binding:
    return Binding("1001", "1001", PushParams("fcm", "f" * 40, "p"), uri, "UA", last_seen, last_seen)


async def test_a_future_last_seen_neither_shadows_later_upserts_nor_survives_the_sweep() -> None:
    now = time.time()
    store = MemoryStore()
    stored = await store.upsert(_binding(now + 10 * 365 * 86400, "sip:old@192.0.2.1"))
    assert stored.last_seen <= time.time()  # clamped to the capture time
    fresh = await store.upsert(_binding(time.time(), "sip:new@192.0.2.1"))
    assert fresh.contact_uri == "sip:new@192.0.2.1"
    assert [b.contact_uri for b in await store.bindings_for("1001")] == ["sip:new@192.0.2.1"]
    assert await store.sweep(time.time() + 1) == 1  # retention over: it goes like any other


async def test_the_sweep_ages_a_future_binding_from_now() -> None:
    t = [1_000_000.0]
    store = MemoryStore(clock=lambda: t[0])
    store._data["1001"] = {"d": _binding(t[0] + 10 * 365 * 86400)}  # as an old version or a dump left it
    assert await store.sweep(t[0] - 30 * 86400) == 0
    t[0] += 31 * 86400
    assert await store.sweep(t[0] - 30 * 86400) == 1


def test_cli_views_escape_what_a_phone_wrote() -> None:
    evil = "Linphone\x1b]0;owned\x07\x1b[2J\x9b31m\u202e"
    push = PushParams("fcm", "f" * 40, "p")
    view = binding_view(Binding("1001\x1b[1m", "1001", push, "sip:1001@h;x=\x1b[5m", evil), reveal=True)
    text = json.dumps(view, ensure_ascii=False)
    for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert raw not in text
    assert "\\x1b" in str(view["user_agent"]) and str(view["user_agent"]).startswith("Linphone")


# ---------------------------------------------------------------- 9. AMI framing


def test_ami_framing_scans_each_byte_once_in_small_reads() -> None:
    parser = AmiParser()
    parser.feed(b"Asterisk Call Manager/11.0.0\r\n")
    total = 0
    chunk = b"Key: value12\r\n"  # never a blank line: one message growing towards the 1 MiB bound
    while total < 256 * 1024:
        assert parser.feed(chunk) == []
        total += len(chunk)
    assert parser.scanned <= total + 3 * (total // len(chunk)) + 64
    done = parser.feed(b"\r\n")
    assert len(done) == 1 and done[0].get("Key") == "value12" and len(done[0].fields) == total // len(chunk)


def test_ami_framing_still_finds_terminators_split_across_reads() -> None:
    parser = AmiParser()
    data = b"Asterisk Call Manager/11.0.0\r\nEvent: A\r\n\r\nEvent: B\r\nX: 1\r\n\r\n"
    out = [m.event for b in data for m in parser.feed(bytes([b]))]
    assert out == ["A", "B"]


# ---------------------------------------------------------------- 10. NAT64 / 6to4


@pytest.mark.parametrize("address", ["64:ff9b::10.0.0.1", "64:ff9b::127.0.0.1", "64:ff9b::169.254.169.254",
                                     "2002:a00:1::1", "2002:7f00:1::1", "2002:a9fe:a9fe::1",
                                     "64:ff9b:1::a00:1"])
async def test_transition_addresses_embedding_private_ipv4_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))

    async def resolve(host: str, port: int) -> list[str]:
        return [address]

    with pytest.raises(UrlRefused, match="non-public"):
        await check_url("https://push.example.com/p", ["*.example.com"], resolve)


def test_transition_addresses_embedding_public_ipv4_stay_public() -> None:
    assert is_public(ipaddress.ip_address("64:ff9b::8.8.8.8"))
    assert is_public(ipaddress.ip_address("2002:808:808::1"))


# ---------------------------------------------------------------- 11. provider URLs must be https


@pytest.mark.parametrize(("body", "key"), [
    ("[[fcm]]\nproject_id='p'\nservice_account='{}'\napi_url='http://fcm.example'\n", "fcm[0].api_url"),
    ("[[apns]]\ntopics=['a.voip']\ncert_file='c.pem'\nproduction_url='http://apns.example'\n",
     "apns[0].production_url"),
    ("[[apns]]\ntopics=['a.voip']\ncert_file='c.pem'\nsandbox_url='http://apns.example'\n", "apns[0].sandbox_url"),
    ("[webhook]\nurl='http://relay.example/p'\nsecret='k'\nproviders=['fcm']\n", "webhook.url"),
])
def test_plain_http_provider_urls_are_refused_unless_the_test_setting_is_on(tmp_path: Path, body: str,
                                                                            key: str) -> None:
    (tmp_path / "c.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[ari]\npassword="p"\n[ami]\nsecret="s"\n' + body)
    with pytest.raises(SettingsError) as err:
        load(cfg, environ={})
    assert err.value.key == key and "https" in str(err.value)
    cfg.write_text('[ari]\npassword="p"\n[ami]\nsecret="s"\n[push]\nallow_plain_http = true\n' + body)
    assert load(cfg, environ={}).push.allow_plain_http


def test_an_http_token_uri_is_refused_and_the_test_setting_warns(tmp_path: Path) -> None:
    (tmp_path / "sa.json").write_text(service_account("proj-x").json("http://oauth.example/token"))
    cfg = tmp_path / "c.toml"
    cfg.write_text('[ari]\npassword="p"\n[ami]\nsecret="s"\n[[fcm]]\nproject_id="proj-x"\n'
                   'service_account_file="sa.json"\n')
    out = cli("-c", str(cfg), "check-config")
    assert out.returncode == 2 and "token_uri" in out.stderr
    cfg.write_text('[ari]\npassword="p"\n[ami]\nsecret="s"\n[push]\nallow_plain_http=true\n[[fcm]]\n'
                   'project_id="proj-x"\nservice_account_file="sa.json"\n')
    out = cli("-c", str(cfg), "check-config")
    assert out.returncode == 0 and "allow_plain_http is on" in out.stderr


# ---------------------------------------------------------------- 5. allow-list ports (contact side)


def test_an_allow_list_entry_without_a_port_allows_the_default_port_only() -> None:
    policy = ContactPolicy(vendor_allowed_hosts=("127.0.0.1", "push.example.com:8443"))
    with pytest.raises(ContactRejected, match="host-not-allowed"):
        parse_contact("sip:1@192.0.2.1;X-PUSH-URI=http://127.0.0.1:8088/ari/channels", policy)
    assert parse_contact("sip:1@192.0.2.1;X-PUSH-URI=http://127.0.0.1/p", policy) is not None
    assert parse_contact("sip:1@192.0.2.1;X-PUSH-URI=https://push.example.com:8443/p", policy) is not None
    with pytest.raises(ContactRejected, match="host-not-allowed"):
        parse_contact("sip:1@192.0.2.1;X-PUSH-URI=https://push.example.com/p", policy)
