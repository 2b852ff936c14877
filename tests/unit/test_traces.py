"""Call traces without sockets: the shapes (traces.py), the in-process store and its bounds
(trace_store.py), the recorder fed by the real call flow and dispatcher (trace_recorder.py, the
call-flow harness of test_call_flow.py), the text timeline and the lookup (trace_view.py), the
JSON route (trace_routes.py) and the test push's refusals (test_push.py)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ari_push.call_events import ChannelInfo, StasisEnd, StasisStart
from ari_push.call_flow import Phase, Status
from ari_push.health import HttpRequest
from ari_push.model import Binding, PushKind, PushOutcome, PushParams
from ari_push.pbx import PbxError
from ari_push.test_push import NO_NON_VOIP, REFUSED, TestPushError, send_test_push
from ari_push.trace_recorder import RESERVE, Tracer, TraceRecorder
from ari_push.trace_routes import TraceRoutes
from ari_push.trace_store import MemoryTraceStore, TraceStart, TraceWrite
from ari_push.trace_view import TraceQueryError, format_trace, lookup
from ari_push.traces import CallTrace, TraceEvent, TraceFormatError
from tests.unit.test_call_flow import AOR, Harness, binding, h_with, push_uri

# ---------------------------------------------------------------- shapes


def sample(call_id: str = "1733100000.42", status: str | None = "ANSWERED") -> CallTrace:
    return CallTrace(call_id, AOR, "2000", 1_733_100_000.5, "node-a", status, 1_733_100_003.0 if status else None,
                     (TraceEvent(0.4, "call_start", None, {"node": "node-a", "resumed": False}),
                      TraceEvent(2.5, "push", "dev1", {"provider": "fcm", "kind": "call", "outcome": "delivered",
                                                       "latency_ms": 2.1, "retries": 0, "token": "ffff…(137)"}),
                      TraceEvent(812.0, "register", "dev1", {"uri_change": "new"})))


def test_trace_json_round_trip_and_derived_fields() -> None:
    trace = sample()
    data = json.loads(json.dumps(trace.to_json()))
    assert CallTrace.from_json(data) == trace
    assert data["providers"] == ["fcm"] and data["in_flight"] is False
    assert sample(status=None).in_flight and sample().providers() == frozenset({"fcm"})


@pytest.mark.parametrize("bad, message", [
    ({"kind": "push"}, "t_ms"),
    ({"t_ms": 1, "kind": "teleport"}, "unknown event kind"),
    ({"t_ms": "1", "kind": "push"}, "t_ms"),
    ({"t_ms": 1, "kind": "push", "detail": {"x": [1]}}, "detail"),
    ({"t_ms": 1, "kind": "push", "device": 5}, "device"),
])
def test_bad_events_are_refused_clearly(bad: dict[str, object], message: str) -> None:
    data = sample().to_json()
    data["events"] = [bad]
    with pytest.raises(TraceFormatError, match=message):
        CallTrace.from_json(data)


def test_bad_trace_fields_are_refused() -> None:
    for key, value in (("call_id", 5), ("started_at", "x"), ("status", 3), ("events", {}), ("dropped", "1")):
        data = sample().to_json()
        data[key] = value
        with pytest.raises(TraceFormatError):
            CallTrace.from_json(data)
    with pytest.raises(TraceFormatError):
        CallTrace.from_json([])  # type: ignore[arg-type]


# ---------------------------------------------------------------- the in-process store


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def open_call(store: MemoryTraceStore, cid: str, aor: str = AOR, caller: str = "2000", at: float = 0.0) -> None:
    store.submit(TraceWrite(cid, start=TraceStart(aor, caller, at, "node-a")))


async def test_memory_store_finds_newest_first_by_aor_caller_status_provider() -> None:
    store = MemoryTraceStore()
    for i in range(5):
        open_call(store, f"c{i}", aor="1001" if i % 2 else "1002", caller=f"20{i % 3}", at=100.0 + i)
    store.submit(TraceWrite("c1", events=(TraceEvent(1.0, "push", "d", {"provider": "apns"}),)))
    store.submit(TraceWrite("c3", status="TIMEOUT", ended_at=110.0))
    assert [t.call_id for t in await store.find(aor="1001")] == ["c3", "c1"]
    assert [t.call_id for t in await store.find(caller="200")] == ["c3", "c0"]
    assert [t.call_id for t in await store.find(status="TIMEOUT")] == ["c3"]
    assert [t.call_id for t in await store.find(status="in_flight")] == ["c4", "c2", "c1", "c0"]
    assert [t.call_id for t in await store.find(provider="apns")] == ["c1"]
    assert [t.call_id for t in await store.find(limit=2)] == ["c4", "c3"]
    assert {t.call_id for t in await store.in_flight()} == {"c0", "c1", "c2", "c4"}
    assert await store.count() == 5 and await store.get("nope") is None


async def test_memory_store_bounds_count_ttl_and_events_per_call() -> None:
    clock = Clock()
    store = MemoryTraceStore(keep=60.0, max_calls=3, max_events=4, clock=clock)
    for i in range(5):
        open_call(store, f"c{i}", at=float(i))
    assert await store.count() == 3 and await store.get("c0") is None  # the oldest went first
    store.submit(TraceWrite("c4", events=tuple(TraceEvent(float(i), "note", None, {"text": "x"}) for i in range(10))))
    c4 = await store.get("c4")
    assert c4 is not None and len(c4.events) == 4 and c4.dropped == 6
    clock.now += 30
    store.submit(TraceWrite("c3", events=(TraceEvent(5.0, "note"),)))  # c3 written since: kept longer
    clock.now += 40
    assert [t.call_id for t in await store.find()] == ["c3"]
    store.submit(TraceWrite("c0", events=(TraceEvent(1.0, "note"),)))  # events of a trace gone: ignored
    assert await store.get("c0") is None


async def test_memory_store_updates_yield_changed_call_ids() -> None:
    store = MemoryTraceStore()
    updates = store.updates()
    first = asyncio.ensure_future(anext(updates))
    await asyncio.sleep(0)
    open_call(store, "c1")
    assert await asyncio.wait_for(first, 2) == "c1"
    store.submit(TraceWrite("c1", status="ANSWERED", ended_at=1.0))
    assert await asyncio.wait_for(anext(updates), 2) == "c1"
    await updates.aclose()


def test_recorder_keeps_the_end_of_a_flooded_call() -> None:
    store = MemoryTraceStore(max_events=20)
    rec = Tracer(store, "node-a", max_events=20).open("c1", "push-1", AOR, "2000")
    for _ in range(100):
        rec.add("register", "dev1", uri_change="same")
    rec.add("hangup", None, side="caller")
    rec.close("CANCELLED")
    trace = asyncio.run(store.get("c1"))
    assert trace is not None
    assert len(trace.events) <= 20 and trace.events[-1].kind == "status" and trace.events[-2].kind == "hangup"
    assert trace.dropped == 100 - (20 - RESERVE - 1)  # call_start took one place
    assert trace.status == "CANCELLED" and not trace.in_flight


def test_recorder_stamps_ms_since_the_invite_and_refuses_unknown_kinds() -> None:
    now = [100.0]
    store = MemoryTraceStore()
    rec = TraceRecorder("c1", store, started=99.5, clock=lambda: now[0])
    open_call(store, "c1")
    rec.add("ringback", None, ok=True)
    now[0] = 100.25
    rec.add("push", "d", provider="fcm", kind="call")  # a detail named "kind" is a detail
    trace = asyncio.run(store.get("c1"))
    assert trace is not None and [e.t_ms for e in trace.events] == [500.0, 750.0]
    assert trace.events[1].detail["kind"] == "call"
    with pytest.raises(ValueError, match="unknown trace event kind"):
        rec.add("bogus")
    TraceRecorder("x", None, 0.0).add("push")  # traces off: nothing, no error


# ---------------------------------------------------------------- fed by the real call flow


def traced(h: Harness) -> MemoryTraceStore:
    store = MemoryTraceStore()
    h.manager.tracer = Tracer(store, "node-a")
    h.dispatcher.observer = h.manager.tracer.on_push
    return store


async def test_a_woken_and_answered_call_has_its_whole_timeline_in_order() -> None:
    h = h_with()
    store = traced(h)
    b = await h.add(binding(port=5001))
    h.pbx.contacts_of[AOR] = [push_uri(5001)]
    flow = h.call()
    await h.push()
    await h.phase(flow, Phase.WAITING)
    h.register(push_uri(5002), b.device_id)
    leg = await h.leg()
    h.answer(leg)
    await h.phase(flow, Phase.BRIDGED)
    h.manager.on_event(StasisEnd("caller-1"))
    assert await h.ended(flow) is Status.ANSWERED
    trace = await store.get("caller-1")
    assert trace is not None and trace.status == "ANSWERED" and trace.aor == AOR and trace.caller == "2000"
    kinds = [e.kind for e in trace.events]
    for kind in ("call_start", "ringback", "push", "register", "leg", "bridge", "hangup", "status"):
        assert kind in kinds, (kind, kinds)
    order = [kinds.index(k) for k in ("call_start", "push", "register", "bridge", "hangup", "status")]
    assert order == sorted(order)
    assert [e.t_ms for e in trace.events] == sorted(e.t_ms for e in trace.events)
    push = next(e for e in trace.events if e.kind == "push")
    assert push.device == b.device_id and push.detail["provider"] == "fcm" and push.detail["kind"] == "call"
    assert push.detail["outcome"] == "delivered" and isinstance(push.detail["latency_ms"], float)
    assert push.detail["retries"] == 0 and "APA91b" not in str(push.detail["token"])  # masked
    reg = next(e for e in trace.events if e.kind == "register")
    assert reg.device == b.device_id and reg.detail["uri_change"] == "new"
    fates = [e.detail["fate"] for e in trace.events if e.kind == "leg" and e.detail.get("leg") == leg.leg_id]
    assert fates[0] == "originated" and "answered" in fates
    assert next(e for e in trace.events if e.kind == "hangup").detail["side"] == "caller"
    assert next(e for e in trace.events if e.kind == "call_start").detail["push_call_id"] == flow.call_id
    await h.close()


async def test_a_timed_out_call_says_timeout_and_its_follow_ups_come_after() -> None:
    h = h_with(default_timeout=0.3)
    store = traced(h)
    await h.add(binding())
    flow = h.call()
    assert await h.ended(flow) is Status.TIMEOUT
    trace = await store.get("caller-1")
    assert trace is not None and trace.status == "TIMEOUT" and trace.ended_at is not None
    pushes = [(e.detail["kind"], e.t_ms) for e in trace.events if e.kind == "push"]
    status_at = next(e.t_ms for e in trace.events if e.kind == "status")
    assert [k for k, _ in pushes] == ["call", "cancel", "missed-call"]
    assert all(t >= status_at for k, t in pushes if k != "call")
    assert status_at >= 250.0  # stamped from the call's start: 0.3 s timeout
    await h.close()


async def test_a_failed_push_is_traced_with_its_outcome() -> None:
    h = h_with()
    store = traced(h)
    h.service.answer = PushOutcome.FAILED
    await h.add(binding())
    flow = h.call()
    assert await h.ended(flow) is Status.PUSH_FAILED
    trace = await store.get("caller-1")
    assert trace is not None and trace.status == "PUSH_FAILED"
    push = next(e for e in trace.events if e.kind == "push")
    assert push.detail["outcome"] == "failed" and push.detail["reason"] == "scripted"
    await h.close()


# ---------------------------------------------------------------- text, lookup, route


def test_text_timeline_reads_like_the_docs_and_escapes_what_callers_send() -> None:
    text = format_trace(sample())
    lines = text.splitlines()
    assert lines[0].startswith("call 1733100000.42 to 1001 from 2000, ") and "ANSWERED after 2.50 s" in lines[0]
    assert any(line.split() == ["+2.5", "ms", "push", "dev1", "fcm", "call", "delivered", "2.1", "ms", "token",
                                "ffff…(137)"] for line in lines), text
    assert any("register  dev1  new URI" in line for line in lines)
    evil = CallTrace("c", "1001", "\x1b[31mred", 0.0, "n", None, None, ())
    assert "\x1b" not in format_trace(evil) and "in flight" in format_trace(evil)


async def test_lookup_by_call_id_aor_or_caller_and_bad_queries() -> None:
    store = MemoryTraceStore()
    for i in range(3):
        open_call(store, f"c{i}", aor="1001", caller="2000", at=float(i))
    assert [t.call_id for t in await lookup(store, "c1")] == ["c1"]
    assert [t.call_id for t in await lookup(store, "1001", last=2)] == ["c2", "c1"]
    assert [t.call_id for t in await lookup(store, "2000")] == ["c2", "c1", "c0"]
    assert await lookup(store, "9999") == []
    for q, last in (("", 1), ("x" * 201, 1), ("a\nb", 1), ("1001", 0)):
        with pytest.raises(TraceQueryError):
            await lookup(store, q, last)


async def test_trace_route_answers_json_and_refuses_bad_queries() -> None:
    store = MemoryTraceStore()
    open_call(store, "c1")
    routes = TraceRoutes(store)
    (method, path, handler), = routes.routes()
    assert (method, path) == ("GET", "/api/traces")
    ok = await handler(HttpRequest("GET", path, query={"q": AOR, "last": "5"}))
    assert ok.status == 200 and [c["call_id"] for c in json.loads(ok.text)["calls"]] == ["c1"]
    none = await handler(HttpRequest("GET", path, query={"q": "4242"}))
    assert none.status == 200 and json.loads(none.text) == {"calls": []}
    for query in ({"q": ""}, {"q": AOR, "last": "x"}, {"q": AOR, "last": "0"}):
        bad = await handler(HttpRequest("GET", path, query=query))
        assert bad.status == 400 and json.loads(bad.text)["error"]


# ---------------------------------------------------------------- test push


VOIP = "a" * 64
REMOTE = "b" * 64


async def test_test_push_refuses_voip_only_ios_and_sends_silently_otherwise() -> None:
    h = Harness()
    fcm = await h.add(binding())
    voip = await h.add(Binding(AOR, AOR, PushParams("apns", VOIP, "com.ex.app.voip"), "sip:x@h", first_seen=2.0))
    results = {r.device_id: r for r in await send_test_push(h.store, h.dispatcher, AOR)}
    assert results[voip.device_id].outcome == REFUSED and results[voip.device_id].detail["reason"] == NO_NON_VOIP
    assert results[voip.device_id].latency_ms is None and VOIP not in json.dumps(results[voip.device_id].to_json())
    assert results[fcm.device_id].outcome == "delivered" and results[fcm.device_id].kind == "refresh"
    assert h.service.sent == [(fcm.device_id, PushKind.REFRESH)]  # one push, not a call, not to the VoIP device
    assert "APA91b" not in json.dumps(results[fcm.device_id].to_json())
    only = await send_test_push(h.store, h.dispatcher, AOR, fcm.device_id)
    assert [r.device_id for r in only] == [fcm.device_id]
    await h.close()


async def test_test_push_unknown_aor_or_device_is_a_clear_error() -> None:
    h = Harness()
    b = await h.add(binding())
    with pytest.raises(TestPushError, match="no device is known for AOR '4242'"):
        await send_test_push(h.store, h.dispatcher, "4242")
    with pytest.raises(TestPushError, match=f"has no device 'deadbeef'.*{b.device_id}"):
        await send_test_push(h.store, h.dispatcher, AOR, "deadbeef")
    assert h.service.sent == []
    await h.close()


def test_dual_apns_token_gets_its_test_push_on_the_remote_token() -> None:
    from ari_push.test_push import voip_only

    dual = Binding(AOR, AOR, PushParams("apns", VOIP, "com.ex.app.voip", extra_tokens=(("remote", REMOTE),)), "u")
    assert not voip_only(dual)
    assert voip_only(Binding(AOR, AOR, PushParams("apns", VOIP, "com.ex.app.voip"), "u"))
    assert not voip_only(Binding(AOR, AOR, PushParams("apns", REMOTE, "com.ex.app"), "u"))


# ---------------------------------------------------------------- [traces] settings


def test_traces_settings_defaults_and_values(tmp_path: Path) -> None:
    from ari_push.settings import load

    base = '[ari]\npassword = "ari-pass-123"\n[ami]\nsecret = "ami-secret-456"\n'
    path = tmp_path / "a.toml"
    path.write_text(base)
    t = load(path, environ={}).traces
    assert (t.enabled, t.keep, t.max_calls, t.max_events) == (True, 86400.0, 10_000, 200)
    path.write_text(base + "[traces]\nenabled = false\nkeep = 3600\nmax_calls = 500\nmax_events = 50\n")
    t = load(path, environ={}).traces
    assert (t.enabled, t.keep, t.max_calls, t.max_events) == (False, 3600.0, 500, 50)
    t = load(path, environ={"ARI_PUSH_TRACES__MAX_CALLS": "42"}).traces
    assert t.max_calls == 42


@pytest.mark.parametrize("line, key", [
    ("keep = 0", "traces.keep"), ("keep = -5", "traces.keep"), ("max_calls = 0", "traces.max_calls"),
    ("max_events = 5", "traces.max_events"), ("enabled = 1", "traces.enabled"), ("colour = true", "traces.colour"),
])
def test_bad_traces_settings_name_the_key(tmp_path: Path, line: str, key: str) -> None:
    from ari_push.settings import SettingsError, load

    path = tmp_path / "a.toml"
    path.write_text(f'[ari]\npassword = "ari-pass-123"\n[ami]\nsecret = "ami-secret-456"\n[traces]\n{line}\n')
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        load(path, environ={})


async def test_build_traces_picks_the_store_the_settings_name() -> None:
    import redis.asyncio as aioredis

    from ari_push.metrics import Metrics
    from ari_push.settings import TraceSettings
    from ari_push.trace_recorder import build_traces
    from ari_push.trace_store import RedisTraceStore

    store, tracer = build_traces(TraceSettings(enabled=False), None, "p:", "n", Metrics())
    assert store is None and tracer.open("c", "p", AOR, "2000") is not None and tracer.sink is None
    store, _ = build_traces(TraceSettings(max_calls=7), None, "p:", "n", Metrics())
    assert isinstance(store, MemoryTraceStore) and store.max_calls == 7
    client = aioredis.Redis()  # never connected: building makes no connection
    store, _ = build_traces(TraceSettings(), client, "p:", "n", Metrics())
    assert isinstance(store, RedisTraceStore) and store.prefix == "p:"
    await client.aclose()


# ---------------------------------------------------------------- abandoned calls, refused calls


def test_an_abandoned_trace_is_not_in_flight_round_trips_and_prints_so() -> None:
    trace = replace(sample(status=None), abandoned_at=1_733_100_010.0)
    assert trace.abandoned and not trace.in_flight
    data = json.loads(json.dumps(trace.to_json()))
    assert data["abandoned"] is True and data["in_flight"] is False and data["abandoned_at"] == 1_733_100_010.0
    assert CallTrace.from_json(data) == trace
    head = format_trace(trace).splitlines()[0]
    assert head.endswith(": abandoned (node node-a gone since 00:40:10 UTC, no other node took the call)"), head
    ended = replace(sample(), abandoned_at=1_733_100_010.0)  # an ended call is never abandoned
    assert not ended.abandoned and not ended.in_flight and ": ANSWERED after" in format_trace(ended)
    data["abandoned_at"] = "soon"
    with pytest.raises(TraceFormatError, match="abandoned_at"):
        CallTrace.from_json(data)


def test_store_filters_tell_in_flight_from_abandoned() -> None:
    from ari_push.trace_store import _matches

    live, gone = sample(status=None), replace(sample(status=None), abandoned_at=1.0)
    assert _matches(live, "in_flight", None) and not _matches(gone, "in_flight", None)
    assert _matches(gone, "abandoned", None) and not _matches(live, "abandoned", None)
    assert not _matches(sample(), "abandoned", None) and not _matches(gone, "ANSWERED", None)


@pytest.mark.parametrize("args, aor, reason", [
    (("bad target!",), "", "bad or missing target 'bad target!'"),
    ((), "", "bad or missing target ''"),
    ((AOR, "timeout=abc"), AOR, "timeout='abc' is not a number"),
])
async def test_a_call_refused_for_bad_stasis_arguments_has_its_trace(args: tuple[str, ...], aor: str,
                                                                     reason: str) -> None:
    h = h_with()
    store = traced(h)
    info = ChannelInfo("caller-9", "Ring", "2000", "Alice", 0.25, "Stasis", ",".join(args))
    h.manager.on_event(StasisStart(info, args, "02:42:ac:11:00:02"))
    assert "caller-9" not in h.manager.calls  # no flow: refused before it starts
    trace = await store.get("caller-9")  # written at once, before the refusal's continue is awaited
    assert trace is not None and trace.status == "NO_DEVICES" and trace.aor == aor and trace.caller == "2000"
    assert [e.kind for e in trace.events] == ["call_start", "note", "status"]
    assert trace.events[0].t_ms >= 250  # from the caller channel's creation, as for every call
    assert trace.events[1].detail["text"] == f"refused: bad Stasis arguments: {reason}"
    assert [t.call_id for t in await store.find(caller="2000")] == ["caller-9"]
    await wait_op(h, "continue")
    assert ("continue", "caller-9", "NO_DEVICES", "") in h.pbx.ops
    await h.close()


async def test_a_call_refused_by_a_draining_daemon_has_its_trace_and_a_failed_continue_is_noted() -> None:
    h = h_with()
    store = traced(h)
    h.manager.draining = True
    h.pbx.failing["continue"] = PbxError("continue", "channel gone", gone=True)
    info = ChannelInfo("caller-8", "Ring", "2000", "Alice", 0.0, "Stasis", AOR)
    h.manager.on_event(StasisStart(info, (AOR,), "02:42:ac:11:00:02"))
    assert "caller-8" not in h.manager.calls

    async def noted() -> CallTrace | None:
        t = await store.get("caller-8")
        return t if t is not None and len(t.events) == 4 else None

    trace = await asyncio.wait_for(_until(noted), 5)
    assert trace.status == "SHUTDOWN" and trace.aor == AOR
    assert [e.kind for e in trace.events] == ["call_start", "note", "status", "note"]
    assert trace.events[1].detail["text"] == "refused: the daemon is stopping"
    assert str(trace.events[3].detail["text"]).startswith("continue in the dialplan failed: ")
    assert [t.call_id for t in await store.find(aor=AOR, status="SHUTDOWN")] == ["caller-8"]
    await h.close()


async def _until(check: Any) -> Any:
    while (found := await check()) is None:
        await asyncio.sleep(0.01)
    return found


async def wait_op(h: Harness, name: str) -> None:
    async def seen() -> bool | None:
        return True if name in h.pbx.names() else None

    await asyncio.wait_for(_until(seen), 5)
