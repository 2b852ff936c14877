"""Builders for the domain objects push tests need (bindings, messages)."""

from __future__ import annotations

import time

from ari_push.model import Binding, Dialect, PushKind, PushMessage, PushParams


def binding(provider: str, token: str, param: str = "", *, sandbox: bool = False, aor: str = "alice") -> Binding:
    dialect = Dialect.ZOIPER if provider == "vendor" else Dialect.RFC8599
    push = PushParams(provider=provider, token=token, param=param, sandbox=sandbox, dialect=dialect)
    return Binding(aor=aor, endpoint=aor, push=push, contact_uri=f"sip:{aor}@192.0.2.10:5060",
                   user_agent="test-phone", first_seen=1.0, last_seen=1.0)


def message(kind: PushKind = PushKind.CALL, *, deadline: float | None = None, ring: float = 30.0,
            call_id: str = "call-1", caller_number: str = "+15551230000", caller_name: str = "Bob",
            callee: str = "alice", extra: tuple[tuple[str, str], ...] = ()) -> PushMessage:
    return PushMessage(kind=kind, call_id=call_id, caller_number=caller_number, caller_name=caller_name,
                       callee=callee, deadline=time.time() + ring if deadline is None else deadline, extra=extra)


def apns_token(n: int) -> str:
    """A well-formed APNs device token (64 hex digits), distinct for each n."""
    return f"{n:064x}"


def fcm_token(n: int | str) -> str:
    """A token of the real FCM registration-token shape (instance id, ':APA91b', 134 more),
    distinct for each n. The fake FCM refuses anything else, as Google does."""
    tag = str(n).replace(" ", "_")
    instance = f"inst{tag}".ljust(22, "x")[-22:] if len(tag) > 18 else f"inst{tag}".ljust(22, "x")
    return f"{instance}:APA91b" + f"{tag}-".ljust(134, "Q")[:134]
