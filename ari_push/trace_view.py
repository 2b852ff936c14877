"""Finding traces by what an admin knows (a call id, an AOR, a caller number) and printing them.

Shared by ``ari-push trace`` and the daemon's ``GET /api/traces`` (trace_routes.py). Every text
that came from a phone or a caller (AOR, caller number, reasons) is escaped before it reaches a
terminal (contacts.printable).
"""

from __future__ import annotations

import time

from ari_push.contacts import printable
from ari_push.traces import CallTrace, TraceEvent, TraceStore

MAX_QUERY = 200
MAX_LAST = 1000


class TraceQueryError(ValueError):
    """A query that cannot name a call: empty, too long, control characters, bad --last."""


def check_query(q: str, last: int) -> None:
    if not q or len(q) > MAX_QUERY:
        raise TraceQueryError(f"give a call id, an AOR or a caller number (1 to {MAX_QUERY} characters)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in q):
        raise TraceQueryError("the query has control characters")
    if not 1 <= last <= MAX_LAST:
        raise TraceQueryError(f"--last must be from 1 to {MAX_LAST}, got {last}")


async def lookup(store: TraceStore, q: str, last: int = 10) -> list[CallTrace]:
    """The call whose id is ``q``; else the last ``last`` calls to the AOR ``q``; else from the
    caller ``q``. Newest first; [] when nothing matches."""
    check_query(q, last)
    trace = await store.get(q)
    if trace is not None:
        return [trace]
    found = await store.find(aor=q, limit=last)
    if found:
        return found
    return await store.find(caller=q, limit=last)


def _num(value: object, fmt: str = ".1f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def summary(e: TraceEvent) -> str:
    """What one event says, in a few words: ``fcm call delivered 2.1 ms``."""
    d = e.detail
    if e.kind == "push":
        text = f"{d.get('provider', '?')} {d.get('kind', '?')} {d.get('outcome', '?')} {_num(d.get('latency_ms'))} ms"
        if d.get("retries"):
            text += f" retries {d['retries']}"
        if d.get("outcome") != "delivered" and d.get("reason"):
            text += f" ({d['reason']})"
        if d.get("token"):
            text += f" token {d['token']}"
        return text
    if e.kind == "register":
        return f"{d.get('uri_change', '?')} URI"
    if e.kind == "leg":
        text = str(d.get("fate", "?"))
        if d.get("cause") is not None:
            text += f" cause {d['cause']}" + (f" {d['cause_txt']}" if d.get("cause_txt") else "")
        if d.get("reason"):
            text += f" ({d['reason']})"
        return text
    if e.kind == "hangup":
        return f"by {d.get('side', '?')}" + (f" cause {d['cause']}" if d.get("cause") is not None else "")
    if e.kind == "status":
        return str(d.get("status", "?"))
    if e.kind == "ringback":
        text = "early media" if d.get("early_media") else "ringing"
        return text if d.get("ok", True) else f"{text} (refused by the PBX)"
    if e.kind == "call_start":
        return f"{'taken over by' if d.get('resumed') else 'on'} node {d.get('node', '?')}"
    if e.kind == "note":
        return str(d.get("text", ""))
    return ""


def format_trace(trace: CallTrace) -> str:
    """A readable timeline: a head line, then ``+12.3 ms  push  dev1  fcm call delivered 2.1 ms``."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(trace.started_at))
    if trace.abandoned and trace.abandoned_at is not None:
        gone = time.strftime("%H:%M:%S", time.gmtime(trace.abandoned_at))
        state = f"abandoned (node {printable(trace.node)} gone since {gone} UTC, no other node took the call)"
    else:
        state = "in flight" if trace.in_flight else str(trace.status)
    if trace.ended_at is not None:
        state += f" after {max(0.0, trace.ended_at - trace.started_at):.2f} s"
    lines = [f"call {printable(trace.call_id)} to {printable(trace.aor) or '?'} from {printable(trace.caller) or '?'}, "
             f"{started} UTC, node {printable(trace.node)}: {state}"]
    width = max((len(f"{e.t_ms:+.1f}") for e in trace.events), default=6)
    for e in trace.events:
        parts = [f"  {e.t_ms:+{width}.1f} ms", e.kind]
        if e.device:
            parts.append(printable(e.device))
        text = printable(summary(e))
        if text:
            parts.append(text)
        lines.append("  ".join(parts))
    if trace.dropped:
        lines.append(f"  ({trace.dropped} more events not kept: traces.max_events)")
    return "\n".join(lines)
