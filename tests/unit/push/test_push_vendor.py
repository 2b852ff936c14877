"""Vendor (Zoiper-style URL) pushes: body template, outcomes, and every SSRF rule."""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest

from ari_push.model import PushKind, PushOutcome
from ari_push.push.vendor import UrlRefused, VendorProvider, check_url, host_allowed, render_body
from ari_push.settings import VendorSettings
from tests.conftest import wait_for
from tests.fakes import FakeVendor, Pki, VendorAnswer
from tests.fakes.builders import binding, message

TEMPLATE = ('{"type":"{kind}","call_id":"{call_id}","caller":"{caller_number}","name":"{caller_name}",'
            '"to":"{callee}","until":{deadline}}')


def provider(allowed: tuple[str, ...] = ("127.0.0.1:*",), **changes: object) -> VendorProvider:
    settings = VendorSettings(body_template=TEMPLATE, timeout=1.0, max_response_bytes=4096)
    for name, value in changes.items():
        object.__setattr__(settings, name, value)

    async def resolve(host: str, port: int) -> list[str]:
        return {"push.internal": ["127.0.0.1"], "push.example.com": ["127.0.0.1"], "localhost": ["127.0.0.1"],
                "public.example.com": ["93.184.216.34"]}[host]

    return VendorProvider(settings, allowed, resolve=resolve)


async def send(p: VendorProvider, url: str, **kw: object) -> tuple[PushOutcome, str]:
    try:
        result = await p.send(binding("vendor", url), message(**kw))  # type: ignore[arg-type]
    finally:
        await p.aclose()
    return result.outcome, result.reason


async def test_posts_the_rendered_template(fake_vendor: FakeVendor) -> None:
    name = 'Eve "the {callee}" \\ \n'
    outcome, _ = await send(provider(), f"{fake_vendor.url}/push/abc?dev=1", caller_name=name,
                            deadline=1_800_000_000.7)
    assert outcome is PushOutcome.DELIVERED
    (req,) = fake_vendor.requests
    assert req.path == "/push/abc" and req.query == "dev=1"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Host"] == f"127.0.0.1:{fake_vendor.port}"
    assert json.loads(req.body) == {"type": "call", "call_id": "call-1", "caller": "+15551230000",
                                    "name": name, "to": "alice", "until": 1800000000}


def test_render_is_single_pass_and_escapes_per_content_type() -> None:
    msg = message(PushKind.CANCEL, caller_name="{call_id}&x=1", deadline=5)
    assert render_body("{kind}|{caller_name}|{nope}", msg, "text/plain") == b"cancel|{call_id}&x=1|{nope}"
    assert render_body("n={caller_name}", msg, "application/x-www-form-urlencoded") == b"n=%7Bcall_id%7D%26x%3D1"
    assert render_body('{"n":"{caller_name}"}', message(caller_name='a"b'), "application/json") == b'{"n":"a\\"b"}'


@pytest.mark.parametrize(
    ("answer", "outcome", "reason"),
    [
        (VendorAnswer(204, b""), PushOutcome.DELIVERED, ""),
        (VendorAnswer(404), PushOutcome.TOKEN_DEAD, "HTTP 404"),
        (VendorAnswer(410), PushOutcome.TOKEN_DEAD, "HTTP 410"),
        (VendorAnswer(429), PushOutcome.RETRY, "HTTP 429"),
        (VendorAnswer(502), PushOutcome.RETRY, "HTTP 502"),
        (VendorAnswer(400), PushOutcome.FAILED, "HTTP 400"),
        (VendorAnswer(401), PushOutcome.FAILED, "HTTP 401"),
    ],
)
async def test_status_mapping(fake_vendor: FakeVendor, answer: VendorAnswer, outcome: PushOutcome,
                              reason: str) -> None:
    fake_vendor.script("/p", answer)
    assert await send(provider(), f"{fake_vendor.url}/p") == (outcome, reason)


async def test_redirect_is_refused_and_not_followed(fake_vendor: FakeVendor) -> None:
    fake_vendor.script("/p", VendorAnswer(302, redirect_to="http://169.254.169.254/latest/meta-data/"))
    fake_vendor.script("/q", VendorAnswer(307, redirect_to=f"{fake_vendor.url}/elsewhere"))
    assert await send(provider(), f"{fake_vendor.url}/p") == (PushOutcome.FAILED, "redirect refused")
    assert await send(provider(), f"{fake_vendor.url}/q") == (PushOutcome.FAILED, "redirect refused")
    assert [r.path for r in fake_vendor.requests] == ["/p", "/q"]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://user:pw@127.0.0.1:{port}/p", "user-info"),
        ("http://127.0.0.1:{port}@evil.example/p", "user-info"),
        ("http://127.0.0.1:{port}\\@evil.example/p", "characters"),
        ("ftp://127.0.0.1:{port}/p", "scheme"),
        ("gopher://127.0.0.1:{port}/p", "scheme"),
        ("http://localhost:{port}/p", "not in capture.vendor_allowed_hosts"),
        ("http://127.0.0.2:{port}/p", "not in capture.vendor_allowed_hosts"),
        ("http://10.1.2.3/p", "not in capture.vendor_allowed_hosts"),
        ("http://[::ffff:127.0.0.1]:{port}/p", "not in capture.vendor_allowed_hosts"),
        ("http://push.example.com:{port}/p", "non-public address"),
        ("http:///p", "no host"),
        ("http://127.0.0.1:{port}/p p", "characters"),
    ],
)
async def test_ssrf_refusals(fake_vendor: FakeVendor, url: str, why: str) -> None:
    p = provider(("127.0.0.1:*", "*.example.com:*"))
    outcome, reason = await send(p, url.format(port=fake_vendor.port))
    assert outcome is PushOutcome.FAILED
    assert reason.startswith("URL refused") and why in reason
    assert fake_vendor.requests == []


async def test_private_ip_needs_an_exact_entry() -> None:
    # wildcards never match IP literals, so a private address is reachable only when listed as such
    with pytest.raises(UrlRefused, match=r"not in capture\.vendor_allowed_hosts"):
        await check_url("http://192.168.1.10/p", ["*.example.com", "*.1.10", "192.168.1.1"])
    allowed = await check_url("http://192.168.1.10/p", ["192.168.1.10"])
    assert allowed.address == "192.168.1.10"


async def test_exact_name_may_resolve_to_private_and_is_pinned(fake_vendor: FakeVendor) -> None:
    outcome, _ = await send(provider(("push.internal:*",)), f"http://push.internal:{fake_vendor.port}/x")
    assert outcome is PushOutcome.DELIVERED
    assert fake_vendor.requests[0].headers["Host"] == f"push.internal:{fake_vendor.port}"


async def test_public_wildcard_host_connects_to_the_checked_address() -> None:
    target = await check_url("https://public.example.com/p?q=1", ["*.example.com"],
                             resolve=lambda h, p: _const(["93.184.216.34"]))
    assert target.url == "https://93.184.216.34:443/p?q=1" and target.host_header == "public.example.com"


async def _const(value: list[str]) -> list[str]:
    return value


def test_allow_list_matching() -> None:
    rules = ["*.zoiper.com", "push.example.org"]
    assert host_allowed("PUSH.Zoiper.com", rules) == (True, False)
    assert host_allowed("a.b.zoiper.com.", rules) == (True, False)
    assert host_allowed("zoiper.com", rules) == (False, False)
    assert host_allowed("evilzoiper.com", rules) == (False, False)
    assert host_allowed("push.example.org", rules) == (True, True)
    assert host_allowed("push.example.org.evil.net", rules) == (False, False)


@pytest.mark.parametrize("declare_length", [True, False])
async def test_huge_response_is_cut_off(fake_vendor: FakeVendor, declare_length: bool) -> None:
    fake_vendor.script("/big", VendorAnswer(200, huge=50 * 1024 * 1024, declare_length=declare_length))
    outcome, reason = await send(provider(), f"{fake_vendor.url}/big")
    assert outcome is PushOutcome.FAILED and reason == "response larger than 4096 bytes"
    if not declare_length:  # read up to the cap, then hung up: the server could not send it all
        await wait_for(lambda: fake_vendor.huge_sent, 10, "the endpoint noticed the hang-up")
        assert fake_vendor.huge_sent[0] < 50 * 1024 * 1024


async def test_stalled_endpoint_is_bounded_by_the_timeout(fake_vendor: FakeVendor) -> None:
    fake_vendor.script("/slow", VendorAnswer(stall=True))
    async with asyncio.timeout(15):  # the endpoint never answers: only the provider's timeout ends this
        outcome, reason = await send(provider(timeout=0.3), f"{fake_vendor.url}/slow")
    assert outcome is PushOutcome.RETRY and reason == "timeout after 0.3s"


async def test_refusal_log_shows_host_not_url(fake_vendor: FakeVendor, caplog: pytest.LogCaptureFixture) -> None:
    secret_path = "/push/7f3a9c-very-secret-device-key"
    await send(provider(("*.example.com",)), f"http://127.0.0.1:{fake_vendor.port}{secret_path}")
    assert "127.0.0.1" in caplog.text and "very-secret" not in caplog.text


async def test_https_checks_the_certificate_against_the_name_not_the_address(pki: Pki) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    fake = await FakeVendor(ctx).start()
    try:
        # the certificate names localhost and 127.0.0.1, not push.internal (which resolves to 127.0.0.1)
        good = await send(provider(("localhost:*", "push.internal:*"), ca_file=str(pki.ca_file)),
                          f"https://localhost:{fake.port}/p")
        bad = await send(provider(("localhost:*", "push.internal:*"), ca_file=str(pki.ca_file)),
                         f"https://push.internal:{fake.port}/p")
    finally:
        await fake.stop()
    assert good == (PushOutcome.DELIVERED, "")
    assert bad[0] is PushOutcome.FAILED and bad[1].startswith("TLS certificate not verified")
    assert [r.headers["Host"] for r in fake.requests] == [f"localhost:{fake.port}"]


# ---------------------------------------------------------------- what a vendor's service refuses, handled


async def test_vendor_fake_refuses_wrong_method_content_type_and_body() -> None:
    import httpx

    fake = await FakeVendor(body_template=TEMPLATE).start()
    try:
        good = render_body(TEMPLATE, message(), "application/json")
        async with httpx.AsyncClient(trust_env=False) as client:
            ok = await client.post(f"{fake.url}/p", content=good, headers={"content-type": "application/json"})
            get = await client.get(f"{fake.url}/p")
            form = await client.post(f"{fake.url}/p", content=good, headers={"content-type": "text/plain"})
            shape = await client.post(f"{fake.url}/p", content=b'{"type":"call"}',
                                      headers={"content-type": "application/json"})
            not_json = await client.post(f"{fake.url}/p", content=b"type=call",
                                         headers={"content-type": "application/json"})
    finally:
        await fake.stop()
    assert ok.status_code == 200
    assert [get.status_code, form.status_code, shape.status_code, not_json.status_code] == [405, 415, 400, 400]
    assert len(fake.requests) == 1 and len(fake.refusals) == 4


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"content_type": "application/x-www-form-urlencoded",
          "body_template": "type={kind}&call={call_id}"}, 415),  # the service takes JSON only
        ({"body_template": '{"kind":"{kind}"}'}, 400),  # the admin's template is not the vendor's shape
    ],
)
async def test_vendor_refusals_are_failed_not_dead(changes: dict[str, str], status: int) -> None:
    """A 400/415 from the vendor is our configuration's fault: the binding stays (not TOKEN_DEAD)."""
    fake = await FakeVendor(body_template=TEMPLATE).start()
    try:
        outcome, reason = await send(provider(**changes), f"{fake.url}/p")
    finally:
        await fake.stop()
    assert (outcome, reason) == (PushOutcome.FAILED, f"HTTP {status}")
    assert fake.requests == [] and fake.refusals[0][0] == status


async def test_vendor_fake_accepts_the_products_rendering_of_its_template() -> None:
    fake = await FakeVendor(body_template=TEMPLATE).start()
    try:
        outcome, _ = await send(provider(), f"{fake.url}/p", caller_name='Eve "q" \\ {callee}\n')
    finally:
        await fake.stop()
    assert outcome is PushOutcome.DELIVERED and fake.refusals == []
