"""The ARI edge: raw websocket JSON -> typed events, and the event filter asked of Asterisk."""

from __future__ import annotations

from typing import Any

import pytest

from ari_push.call_events import (
    ARI_EVENT_TYPES,
    CallBroadcast,
    ChannelDestroyed,
    ChannelStateChange,
    StasisStart,
    from_ari,
)


def _raw(kind: str, **extra: Any) -> dict[str, Any]:
    channel = {"id": "c1", "state": "Ring", "caller": {"number": "2000", "name": "Ann"},
               "dialplan": {"app_name": "Stasis", "app_data": "ari-push,3001"}}
    return {"type": kind, "channel": channel, **extra}


@pytest.mark.parametrize("kind", ARI_EVENT_TYPES)
def test_every_filtered_in_type_becomes_an_event(kind: str) -> None:
    event = from_ari(_raw(kind, args=["3001"], cause=16, cause_txt="Normal Clearing"))
    assert event is not None, f"{kind} is asked of Asterisk but from_ari drops it"
    assert type(event).__name__ == kind
    assert event.channel_id == "c1"


@pytest.mark.parametrize("kind", ["ChannelVarset", "Dial", "ChannelEnteredBridge", "BridgeDestroyed",
                                  "ChannelConnectedLine", "ChannelDialplan", "PlaybackStarted"])
def test_types_outside_the_filter_are_ignored(kind: str) -> None:
    """The filter and from_ari agree: what Asterisk is told not to send, the flow would drop."""
    assert kind not in ARI_EVENT_TYPES
    assert from_ari(_raw(kind)) is None


def test_fields_are_typed_at_the_edge() -> None:
    start = from_ari(_raw("StasisStart", args=["3001", "timeout=20"], asterisk_id="aa:bb"))
    assert isinstance(start, StasisStart)
    assert start.args == ("3001", "timeout=20") and start.pbx_id == "aa:bb"
    assert start.channel.caller_number == "2000" and start.channel.caller_name == "Ann"
    change = from_ari({"type": "ChannelStateChange", "channel": {"id": "c1", "state": "Up"}})
    assert change == ChannelStateChange("c1", "Up")
    busy = from_ari(_raw("ChannelDestroyed", cause=17, cause_txt="User busy"))
    assert busy == ChannelDestroyed("c1", 17, "User busy")
    assert from_ari(_raw("CallBroadcast")) == CallBroadcast("c1")


@pytest.mark.parametrize("raw", [
    {"type": "StasisStart"},  # no channel
    {"type": "StasisStart", "channel": "c1"},  # a channel that is not an object
    {"type": "StasisEnd", "channel": {"name": "PJSIP/x"}},  # no id
    {"channel": {"id": "c1"}},  # no type
])
def test_malformed_messages_are_dropped(raw: dict[str, Any]) -> None:
    assert from_ari(raw) is None


def test_a_cause_that_is_not_a_number_is_zero() -> None:
    assert from_ari(_raw("ChannelDestroyed", cause="busy")) == ChannelDestroyed("c1", 0, "")
