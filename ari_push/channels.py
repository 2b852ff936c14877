"""Facts read from an ARI channel object, and the ids ari-push derives from them.

Pure functions, shared by the call flow, the Asterisk adapter and the cluster janitor.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

CALL_ID_NAMESPACE = uuid.UUID("5b0f3c0e-8a53-4c55-9d3e-3f1c2a7f6a10")
DIALED = "dialed"  # first Stasis argument of every leg ari-push originates: "dialed,<caller channel>"


class ChannelRole(StrEnum):
    CALLER = "caller"  # waiting in Stasis for ari-push
    UP = "up"  # answered: maybe one side of a bridged call
    LEG = "leg"  # a channel ari-push originated, still ringing or never answered


def call_id_for(asterisk_id: str, channel_id: str) -> str:
    """The call id in pushes: the same for one call whichever daemon handles it (after a
    take-over too), so pushes can be made idempotent across daemons."""
    return str(uuid.uuid5(CALL_ID_NAMESPACE, f"{asterisk_id}/{channel_id}"))


def channel_age(channel: dict[str, Any]) -> float:
    """Seconds since Asterisk created the channel: a call resumed after a restart or taken over
    from a dead daemon keeps its original deadline. 0 when unknown or in the future."""
    try:
        created = datetime.strptime(str(channel.get("creationtime", "")), "%Y-%m-%dT%H:%M:%S.%f%z")
    except ValueError:
        return 0.0
    return min(max(0.0, time.time() - created.timestamp()), 3600.0)


def contact_object_id(aor: str, uri: str) -> str:
    """Asterisk's id for a dynamic contact: ``<aor>;@<md5 of the stored URI>`` (measured)."""
    return f"{aor};@{hashlib.md5(uri.encode(), usedforsecurity=False).hexdigest()}"


def stasis_args(channel: dict[str, Any]) -> str:
    """The application arguments a channel entered Stasis with, comma-separated."""
    plan = channel.get("dialplan") or {}
    data = str(plan.get("app_data", ""))
    if plan.get("app_name") == "StasisBroadcast":  # timeout,filter,arg1:arg2
        parts = data.split(",", 2)
        return parts[2].replace(":", ",") if len(parts) > 2 else ""
    return data.partition(",")[2]  # Stasis: app,arg1,arg2


def role_of(state: str, app_name: str, args: str) -> ChannelRole:
    """What a channel found in ari-push's app is, from its state, dialplan application and
    Stasis arguments."""
    if state == "Up":
        return ChannelRole.UP
    if app_name in ("Stasis", "StasisBroadcast") and not args.startswith(DIALED + ","):
        return ChannelRole.CALLER
    return ChannelRole.LEG


def channel_role(channel: dict[str, Any], args: str) -> ChannelRole:
    """``role_of`` an ARI channel object."""
    plan = channel.get("dialplan") or {}
    return role_of(str(channel.get("state", "")), str(plan.get("app_name", "")), args)


def clean_caller_id(text: str) -> str:
    """Caller name or number safe to put in a ``"name" <number>`` caller id."""
    return re.sub(r'[<>"\\\r\n]', "", text)[:80]
