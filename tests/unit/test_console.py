"""The console's access rules, the health server's event streams and guard, the console API's
answers to bad input, the overview's hour window, the [http] console settings.

The daemon's own classes (console.access.Access, console.api.Console, health.HealthServer, the
in-process binding and trace stores) over real loopback sockets; nothing mocked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import pytest

from ari_push.bindings import MemoryStore
from ari_push.console.access import Access, host_name
from ari_push.console.api import Console
from ari_push.console.history import CounterHistory
from ari_push.health import HealthServer, HttpRequest
from ari_push.links import LinkState
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushParams
from ari_push.settings import SettingsError, load, to_display
from ari_push.test_push import TestPushError
from ari_push.trace_store import MemoryTraceStore, TraceStart, TraceWrite
from ari_push.traces import TraceEvent

TOKEN = "b" * 24


def req(method: str = "GET", path: str = "/api/overview", **headers: str) -> HttpRequest:
    return HttpRequest(method, path, {}, {k.replace("_", "-"): v for k, v in headers.items()})


def basic(user_pass: str) -> str:
    return "Basic " + base64.b64encode(user_pass.encode()).decode()


# ---------------------------------------------------------------- access


def test_no_auth_configured_lets_a_loopback_host_through_and_refuses_a_rebound_name() -> None:
    access = Access(bound_host="127.0.0.1")
    assert access.check(req(host="127.0.0.1:9387")) is None
    assert access.check(req(host="localhost:9387")) is None
    assert access.check(req(host="[::1]:9387")) is None
    for host in ("evil.example:9387", "127.0.0.1.evil.example", ""):
        refused = access.check(req(host=host))
        assert refused is not None and refused.status == 403, host
    assert access.check(req(path="/metrics", host="evil.example")) is None  # scrapers name what they like


def test_bearer_and_basic_auth_compared_whole() -> None:
    access = Access(bearer_token=TOKEN, basic_auth="admin:pw:with:colons")
    ok = {"host": "127.0.0.1:1"}
    assert access.check(req(authorization=f"Bearer {TOKEN}", **ok)) is None
    assert access.check(req(authorization=f"bearer  {TOKEN} ", **ok)) is None
    assert access.check(req(authorization=basic("admin:pw:with:colons"), **ok)) is None
    for bad in ("", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Bearer", basic("admin:pw"), basic("admin:"),
                "Basic !!!notbase64", "Basic " + base64.b64encode(b"\xff\xfe").decode(), f"Token {TOKEN}"):
        refused = access.check(req(authorization=bad, **ok))
        assert refused is not None and refused.status == 401, bad
        assert dict(refused.headers)["WWW-Authenticate"].startswith("Basic")
        assert TOKEN not in refused.text and "pw" not in refused.text
    assert dict(Access(bearer_token=TOKEN).check(req(**ok)).headers)["WWW-Authenticate"].startswith("Bearer")


def test_a_server_bound_to_one_address_answers_that_name_and_every_address_any() -> None:
    assert Access(bound_host="192.0.2.7").host_ok("192.0.2.7:9387")
    assert not Access(bound_host="192.0.2.7").host_ok("198.51.100.1:9387")
    assert Access(bound_host="0.0.0.0").host_ok("pbx.example.org:9387")
    assert host_name("[2001:db8::1]:80") == "2001:db8::1" and host_name("Example.ORG") == "example.org"


def test_actions_need_json_the_csrf_token_and_the_same_origin() -> None:
    access = Access()
    good = {"host": "127.0.0.1:9387", "content_type": "application/json; charset=utf-8",
            "x_csrf_token": access.csrf_token}
    assert access.action_refusal(req("POST", **good)) is None
    assert access.action_refusal(req("POST", **good, origin="http://127.0.0.1:9387",
                                     sec_fetch_site="same-origin")) is None
    cases = [({**good, "content_type": "text/plain"}, 415),
             ({**good, "content_type": "application/x-www-form-urlencoded"}, 415),
             ({k: v for k, v in good.items() if k != "x_csrf_token"}, 403),
             ({**good, "x_csrf_token": access.csrf_token[:-1]}, 403),
             ({**good, "x_csrf_token": Access().csrf_token}, 403),  # another daemon's (or restart's) token
             ({**good, "origin": "http://evil.example"}, 403),
             ({**good, "origin": "http://127.0.0.1:9388"}, 403),
             ({**good, "sec_fetch_site": "cross-site"}, 403)]
    for headers, status in cases:
        refused = access.action_refusal(req("POST", **headers))
        assert refused is not None and refused.status == status, headers
    assert len(access.csrf_token) >= 40 and access.csrf_token != Access().csrf_token


# ---------------------------------------------------------------- the console over a real socket


async def http(port: int, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = {"Host": f"127.0.0.1:{port}", **{k.replace("_", "-"): v for k, v in headers.items()}}
    if method == "POST":
        head["Content-Length"] = str(len(body))
    writer.write((f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n")
                 .encode() + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    top, _, payload = raw.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    return int(lines[0].split()[1]), {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:])}, payload


def binding(aor: str = "1001", token: str = "f" * 40) -> Binding:
    now = time.time()
    return Binding(aor, aor, PushParams("fcm", token, "proj"), f"sip:{aor}@192.0.2.1;pn-prid={token}", "UA/1",
                   now - 60, now)


class Rig:
    def __init__(self, server: HealthServer, console: Console, store: MemoryStore, traces: MemoryTraceStore,
                 sent: list[tuple[str, str | None]]) -> None:
        self.server, self.console, self.store, self.traces, self.sent = server, console, store, traces, sent

    @property
    def port(self) -> int:
        return self.server.port

    def post_headers(self) -> dict[str, str]:
        return {"content_type": "application/json", "x_csrf_token": self.console.access.csrf_token}


@pytest.fixture
async def rig():
    store = MemoryStore()
    traces = MemoryTraceStore()
    metrics = Metrics()
    links = [LinkState("ami"), LinkState("ari")]
    links[0].set_up()
    sent: list[tuple[str, str | None]] = []

    async def test_push(aor: str, device: str | None) -> list[dict[str, object]]:
        if not await store.bindings_for(aor):
            raise TestPushError(f"no device is known for AOR {aor!r}")
        sent.append((aor, device))
        return [{"device_id": device, "provider": "fcm", "kind": "refresh", "outcome": "delivered", "latency_ms": 3.0}]

    server = HealthServer("127.0.0.1:0", links, metrics, max_streams=2, header_timeout=2)
    access = Access(bound_host="127.0.0.1")
    console = Console(store=store, metrics=metrics, links=links, access=access, node_id="n1", traces=traces,
                      test_push=test_push, heartbeat=0.2)
    server.guard = access.check
    server.routes += console.routes()
    await server.start()
    stop = asyncio.Event()
    task = asyncio.create_task(console.run(stop))
    yield Rig(server, console, store, traces, sent)
    stop.set()
    await task
    await server.stop()


async def test_pages_and_api_answer_with_masked_tokens(rig: Rig) -> None:
    b = await rig.store.upsert(binding())
    status, headers, page = await http(rig.port, "GET", "/console")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert rig.console.access.csrf_token.encode() in page and "script-src 'self'" in headers["content-security-policy"]
    status, headers, js = await http(rig.port, "GET", "/console/static/console.js")
    assert status == 200 and b"EventSource" in js and headers["content-type"].startswith("text/javascript")
    assert (await http(rig.port, "GET", "/console/static/..%2Fapi.py"))[0] == 404
    status, _, body = await http(rig.port, "GET", "/api/devices?aor=1001")
    data = json.loads(body)
    assert status == 200 and [d["device_id"] for d in data["devices"]] == [b.device_id]
    assert data["devices"][0]["token"] == "ffff…(40)" and "f" * 40 not in body.decode()
    status, _, body = await http(rig.port, "GET", "/api/devices")
    assert json.loads(body)["aors"] == ["1001"]


async def test_bad_queries_and_bodies_get_a_clear_error_and_lose_nothing(rig: Rig) -> None:
    await rig.store.upsert(binding())
    for path, status, words in [("/api/calls?limit=abc", 400, "whole number"), ("/api/calls?limit=0", 400, "between"),
                                ("/api/calls?limit=100000", 400, "between"), ("/api/calls?status=ANSWERD", 400,
                                                                                "one of"),
                                ("/api/calls/nope", 404, "no trace")]:
        got, _, body = await http(rig.port, "GET", path)
        assert got == status and words in json.loads(body)["error"], path
    for body, words in [(b"not json", "not JSON"), (b"[1]", "object"), (b'{"aor": ""}', "object"),
                        (b'{"aor": "1001", "device": 7}', "device id")]:
        got, _, answer = await http(rig.port, "POST", "/api/devices/forget", body, **rig.post_headers())
        assert got == 400 and words in json.loads(answer)["error"], body
    got, _, _ = await http(rig.port, "POST", "/api/devices/forget", b'{"aor": "1001"}',
                           content_type="application/json")
    assert got == 403  # no CSRF token
    assert len(await rig.store.bindings_for("1001")) == 1
    got, _, answer = await http(rig.port, "POST", "/api/test-push", b'{"aor": "nobody"}', **rig.post_headers())
    assert got == 404 and "no device" in json.loads(answer)["error"] and rig.sent == []
    got, _, answer = await http(rig.port, "POST", "/api/test-push", b'{"aor": "1001"}', **rig.post_headers())
    assert got == 200 and json.loads(answer)["results"][0]["outcome"] == "delivered" and rig.sent == [("1001", None)]
    got, _, answer = await http(rig.port, "POST", "/api/devices/forget", b'{"aor": "1001"}', **rig.post_headers())
    assert got == 200 and json.loads(answer) == {"forgotten": 1}


def write_call(traces: MemoryTraceStore, call_id: str, aor: str = "1001", status: str | None = "ANSWERED",
               provider: str = "fcm") -> None:
    now = time.time()
    traces.submit(TraceWrite(call_id, TraceStart(aor, "2000", now, "n1"), (
        TraceEvent(0, "call_start"), TraceEvent(12, "push", "dev1", {"provider": provider, "kind": "call",
                                                                     "outcome": "delivered", "latency_ms": 9.5}),
        TraceEvent(800, "register", "dev1", {"uri_change": "new"})), status, now + 1 if status else None))


async def test_calls_filters_and_one_call(rig: Rig) -> None:
    write_call(rig.traces, "c1", status="ANSWERED")
    write_call(rig.traces, "c2", aor="1002", status="TIMEOUT", provider="apns")
    write_call(rig.traces, "c3", status=None)
    ids = lambda body: [c["call_id"] for c in json.loads(body)["calls"]]  # noqa: E731
    assert ids((await http(rig.port, "GET", "/api/calls"))[2]) == ["c3", "c2", "c1"]
    assert ids((await http(rig.port, "GET", "/api/calls?status=in_flight"))[2]) == ["c3"]
    assert ids((await http(rig.port, "GET", "/api/calls?aor=1002"))[2]) == ["c2"]
    assert ids((await http(rig.port, "GET", "/api/calls?provider=apns"))[2]) == ["c2"]
    assert ids((await http(rig.port, "GET", "/api/calls?status=ANSWERED&limit=1"))[2]) == ["c1"]
    status, _, body = await http(rig.port, "GET", "/api/calls/c1")
    one = json.loads(body)
    assert status == 200 and [e["kind"] for e in one["events"]] == ["call_start", "push", "register"]
    assert one["summary"]["duration_ms"] == 1000.0


async def test_event_stream_heartbeats_carries_updates_and_is_capped(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{rig.port}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert b"200 OK" in head and b"text/event-stream" in head and b"Content-Length" not in head
    assert b": heartbeat" in await asyncio.wait_for(reader.readuntil(b": heartbeat\n\n"), 30)
    write_call(rig.traces, "c9", status=None)
    chunk = await asyncio.wait_for(reader.readuntil(b"\n\n"), 30)
    while b"event: call" not in chunk:
        chunk = await asyncio.wait_for(reader.readuntil(b"\n\n"), 30)
    assert json.loads(chunk.split(b"data: ", 1)[1])["call_id"] == "c9"
    # a second stream is allowed (max 2), a third is refused while they are open
    r2, w2 = await asyncio.open_connection("127.0.0.1", rig.port)
    w2.write(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{rig.port}\r\n\r\n".encode())
    await asyncio.wait_for(r2.readuntil(b"\r\n\r\n"), 30)
    assert rig.server.open_streams == 2
    status, _, _ = await http(rig.port, "GET", "/api/events")
    assert status == 503 and rig.server.refused_streams == 1
    assert (await http(rig.port, "GET", "/healthz"))[0] == 200  # the rest still answers
    # draining closes every stream
    rig.server.draining = True
    assert await asyncio.wait_for(reader.read(), 30) is not None
    assert await asyncio.wait_for(r2.read(), 30) is not None
    for _ in range(100):
        if rig.server.open_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert rig.server.open_streams == 0
    assert (await http(rig.port, "GET", "/api/events"))[0] == 503  # none while draining
    writer.close()
    w2.close()


async def test_guard_covers_metrics_and_console_but_not_probes() -> None:
    metrics = Metrics()
    server = HealthServer("127.0.0.1:0", [], metrics)
    access = Access(bearer_token=TOKEN)
    server.guard, server.authenticated = access.check, True
    await server.start()
    try:
        for path in ("/metrics", "/console", "/api/overview"):
            assert (await http(server.port, "GET", path))[0] == 401, path
        assert (await http(server.port, "GET", "/metrics", authorization=f"Bearer {TOKEN}"))[0] == 200
        assert (await http(server.port, "GET", "/healthz"))[0] == 200
        assert (await http(server.port, "GET", "/readyz"))[0] == 200  # no links: ready
    finally:
        await server.stop()


async def test_no_warning_off_loopback_when_authenticated(caplog: pytest.LogCaptureFixture) -> None:
    server = HealthServer("0.0.0.0:0", [], Metrics())
    server.authenticated = True
    with caplog.at_level("WARNING", "ari_push.health"):
        await server.start()
    await server.stop()
    assert "not authenticated" not in caplog.text


# ---------------------------------------------------------------- the hour window


def test_counter_history_counts_the_last_hour_only() -> None:
    metrics = Metrics()
    history = CounterHistory(metrics.registry, ["ari_push_pushes"], window=3600, interval=60)
    t0 = 1_000_000.0
    history.sample(t0)
    metrics.pushes.labels("fcm", "call", "delivered").inc(5)
    covered, delta = history.window_delta(t0 + 120)
    assert covered == 120 and list(delta.values()) == [5]
    for minute in range(1, 200):  # three hours of samples, one a minute: at most 62 kept
        history.sample(t0 + 60 * minute)
        if minute == 100:
            metrics.pushes.labels("fcm", "call", "failed").inc(2)
    assert len(history) <= 62
    covered, delta = history.window_delta(t0 + 60 * 199)
    assert 3540 <= covered <= 3630
    assert delta == {}  # nothing happened in the last hour
    metrics.pushes.labels("fcm", "call", "failed").inc()
    _, delta = history.window_delta(t0 + 60 * 199)
    assert list(delta.values()) == [1]


# ---------------------------------------------------------------- settings


def config(tmp_path: Path, http: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[ari]\npassword = "x"\n[ami]\nsecret = "y"\n[http]\n{http}\n')
    return path


def test_console_settings_read_secrets_from_files_and_mask_them(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "basic").write_text("admin:pw-long-enough\n")
    s = load(config(tmp_path, f'auth_token_file = "{tmp_path}/token"\nbasic_auth_file = "{tmp_path}/basic"'),
             environ={})
    assert s.http.auth_token == TOKEN and s.http.basic_auth == "admin:pw-long-enough" and s.http.console
    shown = json.dumps(to_display(s))
    assert TOKEN not in shown and "pw-long-enough" not in shown


@pytest.mark.parametrize(("http", "files", "words"), [
    ('auth_token_file = "{d}/t"', {"t": "short"}, "at least 16"),
    ('auth_token_file = "{d}/t"', {"t": "has a space in it, 16+ chars"}, "no spaces"),
    ('basic_auth_file = "{d}/b"', {"b": "nocolon"}, "user:password"),
    ('basic_auth_file = "{d}/b"', {"b": ":pw"}, "user:password"),
    ('basic_auth_file = "{d}/missing"', {}, "cannot read"),
    ("max_streams = 64", {}, "below http.max_connections"),
    ("console = 1", {}, "true or false"),
])
def test_bad_console_settings_are_refused(tmp_path: Path, http: str, files: dict[str, str], words: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SettingsError) as err:
        load(config(tmp_path, http.format(d=tmp_path)), environ={})
    assert words in str(err.value)
    for text in files.values():
        assert text not in str(err.value) or len(text) < 4


def test_access_never_shows_its_secrets() -> None:
    access = Access(bearer_token=TOKEN, basic_auth="admin:pw-long-enough")
    assert TOKEN not in repr(access) and "pw-long-enough" not in repr(access)
    assert access.csrf_token not in repr(access)


async def test_a_reader_that_stops_reading_is_dropped_and_its_stream_cleaned_up(rig: Rig) -> None:
    """A stream whose reader takes nothing: each chunk must go out within header_timeout (2 s
    here); the stream ends, its subscription is gone, the slot is free again."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", rig.port))
    await asyncio.get_running_loop().sock_sendall(sock, f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{rig.port}"
                                                        "\r\n\r\n".encode())
    for _ in range(500):
        if rig.server.open_streams == 1:
            break
        await asyncio.sleep(0.01)
    assert rig.server.open_streams == 1 and len(rig.console._subscribers) == 1
    for i in range(3000):  # updates of big-enough traces fill the socket buffers
        write_call(rig.traces, f"flood-{i}", aor="x" * 4000, status=None)
        if i % 100 == 0:
            await asyncio.sleep(0)
    for _ in range(1500):
        if rig.server.open_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert rig.server.open_streams == 0
    assert len(rig.console._subscribers) == 0
    sock.close()
    assert (await http(rig.port, "GET", "/healthz"))[0] == 200
