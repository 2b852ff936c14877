"""Issue 16 (hardening), the outbound HTTP findings, against local fake servers: each test failed
on the code before the fix. 1 (fan-out bounds), 5 (vendor pools per host and per server name,
allow-list ports), 6 (webhook response size and total time)."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from ari_push.model import PushOutcome
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.fanout import Fanout
from ari_push.push.vendor import UrlRefused, VendorProvider, check_url
from ari_push.push.webhook import WebhookProvider
from ari_push.settings import Secret, VendorSettings, WebhookSettings
from tests.fakes.builders import binding, message
from tests.fakes.keys import Pki
from tests.fakes.vendor import FakeVendor, VendorAnswer


async def _ignore(*_: object) -> None:
    return None


async def _until(condition, what: str, bound: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(bound):
        while not condition():
            await asyncio.sleep(0.01)


def vendor(allowed: tuple[str, ...] = ("127.0.0.1:*",), timeout: float = 60.0, **kw: object) -> VendorProvider:
    return VendorProvider(VendorSettings(timeout=timeout, **kw), allowed)  # type: ignore[arg-type]


# ---------------------------------------------------------------- 5. one pool per host


async def test_a_hanging_vendor_host_does_not_delay_a_push_to_another() -> None:
    async with FakeVendor() as slow, FakeVendor() as fast:
        slow.default = VendorAnswer(stall=True)
        provider = vendor()
        hung = [asyncio.create_task(provider.send(binding("vendor", f"{slow.url}/p/{i}"), message()))
                for i in range(60)]
        try:
            await _until(lambda: len(slow.requests) >= 8, "the slow host holds its connections")
            # Before the fix the 60 hung pushes held the one 50-connection pool for every host, so
            # this push waited for the slow host's 60 s timeout; now it has a pool of its own.
            result = await asyncio.wait_for(provider.send(binding("vendor", f"{fast.url}/p"), message()), 20)
            assert result.outcome is PushOutcome.DELIVERED
            assert len(slow.requests) == 8  # [vendor] max_connections_per_host
        finally:
            for task in hung:
                task.cancel()
            await asyncio.gather(*hung, return_exceptions=True)
            await provider.aclose()


async def test_a_tls_connection_is_never_reused_for_another_server_name(pki: Pki) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)  # valid for localhost and 127.0.0.1 only

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    async with FakeVendor(ctx) as fake:
        provider = VendorProvider(VendorSettings(ca_file=str(pki.ca_file), timeout=10),
                                  ("localhost:*", "push.internal:*"), resolve=resolve)
        try:
            good = await provider.send(binding("vendor", f"https://localhost:{fake.port}/a"), message())
            # same provider, same address and port, another name: its certificate must be checked
            bad = await provider.send(binding("vendor", f"https://push.internal:{fake.port}/b"), message())
        finally:
            await provider.aclose()
    assert good.outcome is PushOutcome.DELIVERED
    assert bad.outcome is PushOutcome.FAILED and bad.reason.startswith("TLS certificate not verified")
    assert [r.path for r in fake.requests] == ["/a"]


@pytest.mark.parametrize(("url", "allowed", "ok"), [
    ("http://127.0.0.1:8088/ari/channels", ("127.0.0.1",), False),
    ("http://127.0.0.1/p", ("127.0.0.1",), True),
    ("https://127.0.0.1/p", ("127.0.0.1",), True),
    ("https://127.0.0.1:80/p", ("127.0.0.1",), False),
    ("http://127.0.0.1:8088/p", ("127.0.0.1:8088",), True),
    ("http://127.0.0.1:8089/p", ("127.0.0.1:8088",), False),
    ("http://127.0.0.1:6379/p", ("127.0.0.1:*",), True),
    ("http://[::1]:8088/p", ("[::1]:8088",), True),
    ("https://a.push.example.com:8443/p", ("*.push.example.com",), False),
    ("https://a.push.example.com:8443/p", ("*.push.example.com:8443",), True),
])
async def test_allow_list_entries_carry_their_port(url: str, allowed: tuple[str, ...], ok: bool) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34"]

    if ok:
        assert (await check_url(url, allowed, resolve)).port in (80, 443, 6379, 8088, 8443)
    else:
        with pytest.raises(UrlRefused, match=r"not in capture\.vendor_allowed_hosts"):
            await check_url(url, allowed, resolve)


# ---------------------------------------------------------------- 1. fan-out bounds


async def test_one_call_has_a_bounded_number_of_pushes_in_flight() -> None:
    async with FakeVendor() as fake:
        fake.default = VendorAnswer(stall=True)
        fanout = Fanout(per_call=5, per_host=100, per_url_host=100)
        d = PushDispatcher([vendor(max_connections_per_host=100)], _ignore, fanout=fanout, call_timeout=60)
        many = [binding("vendor", f"{fake.url}/p/{i}") for i in range(200)]
        task = asyncio.create_task(d.send_many(many, message(ring=120)))
        try:
            await _until(lambda: len(fake.requests) >= 5, "the first pushes")
            await asyncio.sleep(0.3)  # give the other 195 every chance to start: they must not
            assert len(fake.requests) == 5
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await d.aclose()


async def test_pushes_to_one_provider_host_are_bounded_across_calls() -> None:
    async with FakeVendor() as fake:
        fake.default = VendorAnswer(stall=True)
        fanout = Fanout(per_call=50, per_host=100, per_url_host=3)
        d = PushDispatcher([vendor(max_connections_per_host=100)], _ignore, fanout=fanout, call_timeout=60)
        calls = [asyncio.create_task(d.send_many([binding("vendor", f"{fake.url}/c{c}/{i}") for i in range(10)],
                                                 message(call_id=f"call-{c}", ring=120)))
                 for c in range(4)]
        try:
            await _until(lambda: len(fake.requests) >= 3, "the first pushes")
            await asyncio.sleep(0.3)
            assert len(fake.requests) == 3 and fanout.peak_in_flight == {f"vendor:127.0.0.1:{fake.port}": 3}
        finally:
            for task in calls:
                task.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await d.aclose()


# ---------------------------------------------------------------- 6. webhook


def webhook(url: str, **kw: object) -> WebhookProvider:
    return WebhookProvider(WebhookSettings(url=url, secret=Secret("k"), providers=("fcm",), **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("declare_length", [True, False])
async def test_webhook_answer_size_is_capped(declare_length: bool) -> None:
    async with FakeVendor() as relay:
        relay.default = VendorAnswer(200, huge=20 * 1024 * 1024, declare_length=declare_length)
        provider = webhook(f"{relay.url}/hook", timeout=30.0)
        try:
            result = await provider.send(binding("fcm", "t" * 40), message())
        finally:
            await provider.aclose()
    assert result.outcome is PushOutcome.FAILED and result.reason == "response larger than 65536 bytes"


async def test_webhook_that_trickles_its_answer_is_bounded_by_its_timeout() -> None:
    async with FakeVendor() as relay:
        relay.default = VendorAnswer(200, trickle=0.2)  # each read arrives within httpx's read timeout
        provider = webhook(f"{relay.url}/hook", timeout=1.0)
        try:
            result = await asyncio.wait_for(provider.send(binding("fcm", "t" * 40), message()), 20)
        finally:
            await provider.aclose()
    assert result.outcome is PushOutcome.RETRY and "timeout" in result.reason
