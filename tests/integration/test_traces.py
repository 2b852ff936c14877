"""Call traces and the test push on the real rig: real Asterisk, real Redis, the daemon as
service.py builds it, its own providers against the strict local FCM and APNs services, and the
``ari-push`` CLI run as an admin runs it (a separate process reading the daemon's settings).
docs/operations.md, "Call traces"."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ari_push.traces import CallTrace, TraceEvent
from rig.asterisk import AsteriskInstance
from rig.redis import RedisServer
from rig.sipua import SipUA
from tests.conftest import RunningDaemon, daemon_config, wait_for
from tests.fakes import FakeApns
from tests.fakes.builders import fcm_token
from tests.integration.test_calls import (  # noqa: F401
    PushEndpoint,
    hang_up_and_check,
    no_channels,
    push_endpoint,
)
from tests.integration.test_cluster import (  # noqa: F401
    caller_channel,
    cluster_config,
    daemons,
    shared_sleeping_phone,
)
from tests.integration.test_freeswitch_calls import fs_daemon  # noqa: F401
from tests.integration.test_iphone import apns, iphone  # noqa: F401
from tests.integration.test_iphone import start as iphone_daemon
from tests.integration.test_providers_e2e import TIMEOUT as CALL_TIMEOUT
from tests.integration.test_providers_e2e import (  # noqa: F401
    Services,
    answered_call,
    daemon,
    fcm_params,
    fcm_pushes,
    services,
    sleeping_phone,
    unanswered_call,
)

VENDOR = ('[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n[calls]\ndefault_timeout = 8\n[push]\nburst = 50\n'
          '[vendor]\nbody_template = \'{"type":"{kind}","call_id":"{call_id}","caller":"{caller_number}"}\'\n')


async def cli(config: Path, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """``ari-push --config <config> <args>`` as a separate process (never blocking this loop,
    which serves the fake push services)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ari_push", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def config_of(tmp_path: Path) -> Path:
    return tmp_path / "ari-push.toml"  # where daemon_config wrote the daemon's settings


async def ended_trace(store: Any, aor: str, status: str | None = None, timeout: float = 15) -> CallTrace:
    """The newest trace of ``aor`` once it has its final status (and ``status`` if given)."""
    async def done() -> CallTrace | None:
        found = await store.find(aor=aor, limit=1)
        if found and found[0].status is not None and (status is None or found[0].status == status):
            return found[0]  # type: ignore[no-any-return]
        return None

    trace: CallTrace = await wait_for(done, timeout, f"the trace of the call to {aor} ended")
    return trace


def first(trace: CallTrace, kind: str, /, **detail: object) -> TraceEvent:
    found = [e for e in trace.events if e.kind == kind and all(e.detail.get(k) == v for k, v in detail.items())]
    assert found, f"no {kind} {detail} in {[(e.kind, dict(e.detail)) for e in trace.events]}"
    return found[0]


async def test_a_call_woken_by_an_fcm_push_has_its_timeline_in_redis_and_the_cli_prints_it(
        tmp_path: Path, daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance,  # noqa: F811
        aor: str, capsys: Any) -> None:
    token = fcm_token(f"trace{aor}")
    phone = await sleeping_phone(ensure_asterisk, aor, fcm_params(token), daemon)
    device = (await daemon.daemon.store.bindings_for(aor))[0].device_id
    await answered_call(ensure_asterisk, phone, aor, lambda: fcm_pushes(services.fcm, token, "call"))
    trace = await ended_trace(daemon.daemon.traces, aor, "ANSWERED")
    assert trace.caller == "2000" and trace.node == daemon.daemon.node_id and trace.ended_at is not None
    start = first(trace, "call_start")
    push = first(trace, "push", kind="call")
    register = first(trace, "register")
    answered = first(trace, "leg", fate="answered")
    bridge, hangup, status = first(trace, "bridge"), first(trace, "hangup"), first(trace, "status")
    steps = [start, push, register, answered, bridge, hangup, status]
    assert [trace.events.index(e) for e in steps] == sorted(trace.events.index(e) for e in steps)
    assert [e.t_ms for e in steps] == sorted(e.t_ms for e in steps) and start.t_ms >= 0
    assert push.device == device and push.detail["provider"] == "fcm" and push.detail["outcome"] == "delivered"
    assert isinstance(push.detail["latency_ms"], float) and push.detail["latency_ms"] > 0
    assert push.detail["retries"] == 0 and token not in json.dumps(trace.to_json())  # the token masked
    assert register.device == device and register.detail["uri_change"] in ("new", "same")
    assert first(trace, "ringback").detail["ok"] is True and status.detail["status"] == "ANSWERED"
    assert hangup.detail["side"] == "callee"  # the phone hung up (answered_call)

    # the CLI, as a separate process reading Redis from the daemon's settings
    rc, out, err = await cli(config_of(tmp_path), "trace", trace.call_id)
    assert rc == 0, err
    assert out.startswith(f"call {trace.call_id} to {aor} from 2000, ") and ": ANSWERED after " in out
    assert re.search(rf"^\s+\+\d+\.\d ms  push  {device}  fcm call delivered \d+\.\d ms", out, re.M), out
    assert re.search(rf"^\s+\+\d+\.\d ms  register  {device}  (new|same) URI$", out, re.M), out
    assert token not in out
    with capsys.disabled():
        print(f"\n$ ari-push trace {trace.call_id}\n{out}")
    rc, out, _ = await cli(config_of(tmp_path), "trace", aor, "--last", "3", "--json")
    assert rc == 0 and [c["call_id"] for c in json.loads(out)["calls"]] == [trace.call_id]
    assert CallTrace.from_json(json.loads(out)["calls"][0]) == trace
    rc, out, _ = await cli(config_of(tmp_path), "trace", "2000", "--last", "1")  # by caller number
    assert rc == 0 and trace.call_id in out
    # bad input: a clear error and a non-zero exit, nothing printed on stdout
    rc, out, err = await cli(config_of(tmp_path), "trace", "no-such-call-4242")
    assert rc == 1 and out == "" and "no trace for call id, AOR or caller 'no-such-call-4242'" in err
    rc, out, err = await cli(config_of(tmp_path), "trace", "")
    assert rc == 2 and out == "" and "give a call id" in err
    rc, _, err = await cli(config_of(tmp_path), "trace", aor, "--last", "0")
    assert rc == 2 and "--last" in err


async def test_test_push_reaches_the_fcm_service_silently_and_bad_input_is_refused(
        tmp_path: Path, daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance,  # noqa: F811
        aor: str) -> None:
    token = fcm_token(f"testpush{aor}")
    await sleeping_phone(ensure_asterisk, aor, fcm_params(token), daemon)
    device = (await daemon.daemon.store.bindings_for(aor))[0].device_id
    rc, out, err = await cli(config_of(tmp_path), "test-push", aor)
    assert rc == 0, err
    assert re.fullmatch(rf"{device}  fcm  refresh  delivered  \d+\.\d ms  HTTP 200  token \S+\n", out), out
    assert token not in out and token not in err
    (sent,) = services.fcm.sends_to(token)
    message = sent.body["message"]
    assert message["data"]["type"] == "refresh" and message["data"]["test"] == "1"
    assert message["android"]["priority"] == "normal" and "notification" not in message  # data only, silent
    rc, out, _ = await cli(config_of(tmp_path), "test-push", aor, device)
    assert rc == 0 and out.startswith(device) and len(services.fcm.sends_to(token)) == 2
    # bad input
    rc, out, err = await cli(config_of(tmp_path), "test-push", "4242")
    assert rc == 1 and out == "" and "no device is known for AOR '4242'" in err
    rc, out, err = await cli(config_of(tmp_path), "test-push", aor, "0123456789abcdef0123")
    assert rc == 1 and out == "" and f"has no device '0123456789abcdef0123' (its devices: {device})" in err
    rc, out, err = await cli(config_of(tmp_path), "test-push", "not an aor!")
    assert rc == 2 and "bad AOR" in err
    assert len(services.fcm.sends_to(token)) == 2  # nothing more was sent


async def test_a_timed_out_call_says_timeout_then_its_cancel_and_missed_call(
        daemon: RunningDaemon, services: Services, ensure_asterisk: AsteriskInstance,  # noqa: F811
        aor: str) -> None:
    token = fcm_token(f"timeout{aor}")
    await sleeping_phone(ensure_asterisk, aor, fcm_params(token), daemon)
    await unanswered_call(ensure_asterisk, aor, 480)
    trace = await ended_trace(daemon.daemon.traces, aor, "TIMEOUT")
    status = first(trace, "status", status="TIMEOUT")
    assert status.t_ms >= CALL_TIMEOUT * 1000 * 0.95
    assert first(trace, "push", kind="call").t_ms < status.t_ms
    await wait_for(lambda: _has_follow_ups(daemon, aor), 15, "cancel and missed-call pushes in the trace")


async def _has_follow_ups(rd: RunningDaemon, aor: str) -> bool:
    (trace,) = await rd.daemon.traces.find(aor=aor, limit=1)
    kinds = {str(e.detail.get("kind")) for e in trace.events if e.kind == "push" and e.detail.get("outcome")}
    return {"cancel", "missed-call"} <= kinds


async def test_test_push_to_an_iphone_is_background_on_its_remote_token_never_voip(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon: Any,
        apns: tuple[FakeApns, Path, Path], aor: str, aor2: str) -> None:  # noqa: F811
    fake = apns[0]
    rd = await iphone_daemon(tmp_path, ensure_asterisk, ensure_redis, start_daemon, apns)
    phone = await iphone(ensure_asterisk, fake, rd, aor)
    voip_only = await iphone(ensure_asterisk, fake, rd, aor2, dual=False)
    try:
        rc, out, err = await cli(config_of(tmp_path), "test-push", aor)
        assert rc == 0, err
        assert re.fullmatch(r"\S+  apns  refresh  delivered  \d+\.\d ms  HTTP 200  token \S+\n", out), out
        (request,) = fake.requests
        assert request.token == phone.remote_token.lower()  # the remote token, never the VoIP one
        assert request.headers["apns-push-type"] == "background" and request.headers["apns-priority"] == "5"
        assert request.headers["apns-topic"] == "com.example.phone"
        assert phone.violations == []  # the simulated iPhone saw nothing iOS would kill the app for
        assert phone.remote_token not in out and phone.voip_token not in out
        rc, out, err = await cli(config_of(tmp_path), "test-push", aor2)
        assert rc == 4 and "refused" in out and "no non-VoIP token" in out
        assert voip_only.voip_token not in out
        assert len(fake.requests) == 1  # no push of any kind to the VoIP-only phone
    finally:
        phone.close()
        voip_only.close()


@pytest.mark.parametrize("mode", ["broadcast", "lease"])
async def test_a_take_over_keeps_one_trace_per_call_named_for_the_new_node(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, daemons,  # noqa: F811
        push_endpoint: PushEndpoint, aor: str, mode: str) -> None:  # noqa: F811
    from ari_push.service import make_redis
    from ari_push.settings import RedisSettings
    from ari_push.trace_store import RedisTraceStore

    prefix = f"c-{time.monotonic_ns()}:"
    apps = ("ari-push-a", "ari-push-b") if mode == "broadcast" else ("ari-push", "ari-push")
    a = daemons("a", cluster_config(tmp_path, ensure_asterisk, ensure_redis, "a", mode, apps[0], prefix))
    await a.wait_log("ari link up")
    await a.wait_log("ami link up")
    phone = await shared_sleeping_phone(ensure_asterisk, ensure_redis, prefix, aor, push_endpoint)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(f"c{aor}" if mode == "broadcast" else aor)
    await asyncio.wait_for(push_endpoint.on_call.get(), 10)
    b = daemons("b", cluster_config(tmp_path, ensure_asterisk, ensure_redis, "b", mode, apps[1], prefix))
    await b.wait_log("ami link up")
    if mode == "lease":
        await b.wait_log("ari link down: standby")
    channel = caller_channel(ensure_asterisk)
    client = make_redis(RedisSettings(url=ensure_redis.url))
    store = RedisTraceStore(client, prefix)
    try:
        await wait_for(lambda: _pushed(store, channel), 10, "daemon a's push in the trace")
        a.kill()
        await b.wait_log("adopting waiting call" if mode == "broadcast" else "resuming call", timeout=15)

        async def taken_over() -> bool:
            t = await store.get(channel)
            return t is not None and t.node == "b" and t.in_flight

        await wait_for(taken_over, 10, "the trace in flight on node b (not abandoned)")
        await phone.open()
        assert await phone.register() == 200
        await asyncio.wait_for(phone.invites.get(), 10)
        assert (await asyncio.wait_for(answer, 10)).status == 200
        await hang_up_and_check(phone, caller, ensure_asterisk)
        trace = await ended_trace(store, aor, "ANSWERED")
        assert trace.call_id == channel and len(await store.find(aor=aor)) == 1  # one trace for the call
        assert trace.node == "b"
        starts = [(e.detail["node"], e.detail["resumed"]) for e in trace.events if e.kind == "call_start"]
        assert starts == [("a", False), ("b", True)]
        assert [e.detail["kind"] for e in trace.events if e.kind == "push"] == ["call"]  # by a, once
        assert first(trace, "leg", fate="answered").t_ms < first(trace, "bridge").t_ms
        rc, out, err = await cli(tmp_path / "b" / "ari-push.toml", "trace", channel)
        assert rc == 0, err
        assert "taken over by node b" in out and "vendor call delivered" in out and ": ANSWERED after" in out
    finally:
        await client.aclose()
        phone.close()
        caller.close()


async def _pushed(store: Any, channel: str) -> bool:
    trace = await store.get(channel)
    return trace is not None and any(e.kind == "push" for e in trace.events)


async def test_redis_down_when_a_call_starts_the_call_succeeds_and_its_trace_is_written_when_redis_is_back(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, start_daemon, push_endpoint: PushEndpoint,  # noqa: F811
        aor: str) -> None:
    redis = RedisServer()
    redis.start()
    try:
        rd = await start_daemon(daemon_config(tmp_path, ensure_asterisk, redis.url, VENDOR))
        await wait_for(lambda: rd.daemon.redis_link.up, 10, "redis up")
        phone = SipUA(aor, ensure_asterisk.ports.sip)
        await phone.open()
        assert await phone.register(f"X-PUSH-URI=http://127.0.0.1:{push_endpoint.port}/push/{aor}") == 200
        await wait_for(lambda: rd.daemon.store.bindings_for(aor), 5, "binding stored")
        phone.close()
        redis.stop()  # down before the call starts: its start, ringback and push are not written
        caller = SipUA("2000", ensure_asterisk.ports.sip)
        await caller.open()
        answer = caller.start_call(aor)
        assert (await asyncio.wait_for(push_endpoint.on_call.get(), 10))["type"] == "call"
        await wait_for(lambda: rd.daemon.traces.held > 0, 10, "trace writes held while Redis is down")
        redis.start()
        await phone.open()
        assert await phone.register() == 200
        await asyncio.wait_for(phone.invites.get(), 10)
        assert (await asyncio.wait_for(answer, 15)).status == 200
        await hang_up_and_check(phone, caller, ensure_asterisk)
        trace = await ended_trace(rd.daemon.traces, aor, "ANSWERED", timeout=30)  # written once Redis is back
        steps = [first(trace, "call_start"), first(trace, "ringback"), first(trace, "push", kind="call"),
                 first(trace, "register"), first(trace, "bridge"), first(trace, "status")]
        assert [e.t_ms for e in steps] == sorted(e.t_ms for e in steps)
        assert rd.daemon.traces.dropped == 0 and rd.daemon.traces.held == 0  # nothing lost: the buffer held it
        for reason in ("redis", "overflow", "stopped"):
            assert not rd.daemon.metrics.registry.get_sample_value("ari_push_trace_writes_dropped_total",
                                                                   {"reason": reason})
    finally:
        redis.cleanup()


async def test_calls_refused_before_their_flow_starts_have_a_trace(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, start_daemon,
        push_endpoint: PushEndpoint, aor: str) -> None:  # noqa: F811
    """Bad Stasis arguments, and a call reaching a draining daemon: call_start, why, the status."""
    import urllib.parse

    from ari_push.service import make_redis
    from ari_push.settings import RedisSettings
    from ari_push.trace_store import RedisTraceStore
    from tests.integration.test_calls import sleeping_phone as plain_sleeping_phone

    config = daemon_config(tmp_path, ensure_asterisk, ensure_redis.url,
                           "shutdown_timeout = 3\n" + VENDOR)
    rd = await start_daemon(config)
    client = make_redis(RedisSettings(url=ensure_redis.url))
    store = RedisTraceStore(client, rd.daemon.keys.prefix)
    base = 7_000_000 + int(time.time() * 1000) % 1_000_000

    def originate(args: str, number: int) -> None:  # a channel entering Stasis(ari-push,<args>)
        query = urllib.parse.urlencode({"endpoint": "Local/1234@rig-echo", "app": "ari-push", "appArgs": args,
                                        "callerId": f"Trace <{number}>"})
        ensure_asterisk.ari("POST", f"/ari/channels?{query}")

    async def ended(number: int) -> CallTrace | None:
        found = await store.find(caller=str(number), limit=1)
        return found[0] if found and found[0].status is not None else None

    phone = await plain_sleeping_phone(ensure_asterisk, aor, push_endpoint, rd.daemon.store)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    try:
        await asyncio.to_thread(originate, "bad target!", base)
        bad: CallTrace = await wait_for(lambda: ended(base), 15, "the trace of the call with bad arguments")
        assert bad.status == "NO_DEVICES" and bad.aor == "" and bad.node == rd.daemon.node_id
        assert [e.kind for e in bad.events][:3] == ["call_start", "note", "status"]
        assert bad.events[1].detail["text"] == "refused: bad Stasis arguments: bad or missing target 'bad target!'"
        rc, out, err = await cli(config_of(tmp_path), "trace", str(base))
        assert rc == 0, err
        assert f"to ? from {base}" in out and ": NO_DEVICES after" in out and "bad or missing target" in out

        await caller.open()
        answer = caller.start_call(aor)  # a call waiting when the daemon is told to stop
        await asyncio.wait_for(push_endpoint.on_call.get(), 10)
        stopping = asyncio.ensure_future(rd.stop())
        await wait_for(lambda: rd.daemon.calls.draining, 5, "the daemon draining")
        await asyncio.to_thread(originate, aor, base + 1)  # a new call during the drain: refused
        late: CallTrace = await wait_for(lambda: ended(base + 1), 15, "the trace of the call refused by the drain")
        assert late.status == "SHUTDOWN" and late.aor == aor
        assert [e.kind for e in late.events][:3] == ["call_start", "note", "status"]
        assert late.events[1].detail["text"] == "refused: the daemon is stopping"
        await asyncio.wait_for(stopping, 20)
        assert (await asyncio.wait_for(answer, 10)).status == 480  # the waiting call: continued, SHUTDOWN
        rc, out, err = await cli(config_of(tmp_path), "trace", str(base + 1))
        assert rc == 0, err
        assert ": SHUTDOWN after" in out and "refused: the daemon is stopping" in out
    finally:
        await _clean_up(ensure_asterisk, client, phone, caller)


async def _clean_up(asterisk: AsteriskInstance, client: Any, *uas: SipUA) -> None:
    """Close the phones and the Redis client, hang up every channel left (a dead daemon's too)."""
    import contextlib
    import urllib.error

    for ua in uas:
        ua.close()
    await client.aclose()

    def hang_up_all() -> None:
        channels = asterisk.ari("GET", "/ari/channels")
        for c in channels if isinstance(channels, list) else []:
            with contextlib.suppress(urllib.error.HTTPError):
                asterisk.ari("DELETE", f"/ari/channels/{c['id']}")

    await asyncio.to_thread(hang_up_all)
    await wait_for(lambda: no_channels(asterisk), 10, "no channels left")


async def test_a_call_whose_daemon_dies_with_no_take_over_reads_as_abandoned(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, ensure_redis: RedisServer, daemons,  # noqa: F811
        push_endpoint: PushEndpoint, aor: str) -> None:  # noqa: F811
    from ari_push.service import make_redis
    from ari_push.settings import RedisSettings
    from ari_push.trace_store import RedisTraceStore

    prefix = f"c-{time.monotonic_ns()}:"
    config = cluster_config(tmp_path, ensure_asterisk, ensure_redis, "a", "broadcast", "ari-push-a", prefix)
    a = daemons("a", config)
    await a.wait_log("ari link up")
    await a.wait_log("ami link up")
    await shared_sleeping_phone(ensure_asterisk, ensure_redis, prefix, aor, push_endpoint)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(f"c{aor}")
    client = make_redis(RedisSettings(url=ensure_redis.url))
    store = RedisTraceStore(client, prefix)
    try:
        await asyncio.wait_for(push_endpoint.on_call.get(), 10)
        channel = caller_channel(ensure_asterisk)
        await wait_for(lambda: _pushed(store, channel), 10, "daemon a's push in the trace")
        live = await store.get(channel)
        assert live is not None and live.in_flight and [t.call_id for t in await store.in_flight()] == [channel]
        a.kill()  # SIGKILL: no drain, no take-over (the only daemon)
        killed = time.time()

        async def abandoned() -> CallTrace | None:
            found = await store.find(status="abandoned")
            return found[0] if found else None

        trace: CallTrace = await wait_for(abandoned, 15, "the call read as abandoned")
        assert trace.call_id == channel and trace.node == "a" and trace.status is None and not trace.in_flight
        assert trace.abandoned_at is not None and killed - 1 <= trace.abandoned_at <= killed + 2 + 1  # node_ttl 2
        assert await store.in_flight() == [] and await store.find(status="in_flight") == []
        rc, out, err = await cli(config, "trace", channel)
        assert rc == 0, err
        assert re.search(r": abandoned \(node a gone since \d\d:\d\d:\d\d UTC, no other node took the call\)$",
                         out.splitlines()[0]), out
        rc, out, _ = await cli(config, "trace", channel, "--json")
        assert rc == 0 and json.loads(out)["calls"][0]["abandoned"] is True
    finally:
        answer.cancel()
        await _clean_up(ensure_asterisk, client, caller)


async def test_the_cli_reads_the_embedded_store_from_the_running_daemon(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, start_daemon: Any) -> None:
    from rig.redis import free_port

    config = daemon_config(tmp_path, ensure_asterisk)  # no [redis]: the traces live in the daemon
    config.write_text(config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{free_port()}"'))
    rd = await start_daemon(config)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    try:
        assert (await asyncio.wait_for(caller.call("98765"), 10)).status == 480  # not a known AOR
    finally:
        caller.close()
    trace = await ended_trace(rd.daemon.traces, "98765", "NO_DEVICES")
    rc, out, err = await cli(config, "trace", "98765")
    assert rc == 0, err
    assert out.startswith(f"call {trace.call_id} to 98765 from 2000, ") and ": NO_DEVICES after" in out
    rc, out, _ = await cli(config, "trace", trace.call_id, "--json")
    assert rc == 0 and CallTrace.from_json(json.loads(out)["calls"][0]) == await rd.daemon.traces.get(trace.call_id)
    rc, out, err = await cli(config, "trace", "4242")
    assert rc == 1 and out == "" and "no trace for call id, AOR or caller '4242'" in err
    await rd.stop()
    rc, out, err = await cli(config, "trace", "98765")
    assert rc == 1 and out == "" and "the traces live inside the running daemon, which does not answer at" in err


async def test_the_cli_sends_the_daemons_credentials_when_its_http_server_asks_for_them(
        tmp_path: Path, ensure_asterisk: AsteriskInstance, start_daemon: Any) -> None:
    from rig.redis import free_port

    token = tmp_path / "http-token"
    token.write_text("a-bearer-token-of-32-characters!\n")
    config = daemon_config(tmp_path, ensure_asterisk)
    listen = f'listen = "127.0.0.1:{free_port()}"'
    config.write_text(config.read_text().replace('listen = "127.0.0.1:0"', f'{listen}\nauth_token_file = "{token}"'))
    rd = await start_daemon(config)
    caller = SipUA("2000", ensure_asterisk.ports.sip)
    await caller.open()
    try:
        assert (await asyncio.wait_for(caller.call("98766"), 10)).status == 480
    finally:
        caller.close()
    await ended_trace(rd.daemon.traces, "98766", "NO_DEVICES")
    rc, out, err = await cli(config, "trace", "98766")
    assert rc == 0 and ": NO_DEVICES after" in out, err
    wrong = tmp_path / "wrong-token"
    wrong.write_text("another-token-of-32-characters!!\n")
    other = tmp_path / "other.toml"
    other.write_text(config.read_text().replace(str(token), str(wrong)))
    rc, out, err = await cli(other, "trace", "98766")
    assert rc == 1 and out == "" and "refused this CLI's credentials" in err
    assert "another-token" not in err and "a-bearer-token" not in err  # no secret in the error


async def test_a_freeswitch_call_is_traced_through_the_shared_call_manager(
        fs_daemon: Any, ensure_freeswitch: Any, push_endpoint: PushEndpoint, aor: str, aor2: str) -> None:  # noqa: F811
    from rig.freeswitch import SIP_PASSWORD
    from tests.integration.test_freeswitch_calls import parked
    from tests.integration.test_freeswitch_calls import sleeping_phone as fs_sleeping_phone
    from tests.integration.test_freeswitch_calls import wake_on_push as fs_wake_on_push

    fs = ensure_freeswitch
    phone = await fs_sleeping_phone(fs, aor, push_endpoint, fs_daemon)
    caller = SipUA(aor2, fs.ports.sip, password=SIP_PASSWORD)
    await caller.open()
    try:
        call = caller.start_call(aor, timeout=20)
        await fs_wake_on_push(phone, push_endpoint, same_port=False)
        await asyncio.wait_for(phone.invites.get(), 10)
        assert (await call).status == 200
        assert await phone.hangup() == 200
        await asyncio.wait_for(caller.byes.get(), 5)
        await wait_for(lambda: not parked(fs), 5, "no channels left")
    finally:
        phone.close()
        caller.close()
    trace = await ended_trace(fs_daemon.traces, aor, "ANSWERED")
    steps = [first(trace, "call_start"), first(trace, "push", kind="call", outcome="delivered"),
             first(trace, "register"), first(trace, "leg", fate="answered"), first(trace, "bridge"),
             first(trace, "hangup"), first(trace, "status")]
    assert [trace.events.index(e) for e in steps] == sorted(trace.events.index(e) for e in steps)
    assert steps[1].detail["provider"] == "vendor" and trace.caller == aor2
