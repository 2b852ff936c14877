"""The FreeSWITCH adapter's pure parts: ESL channel events -> the flow's typed events, and the live
contacts read from `sofia xmlstatus` (shapes as FreeSWITCH 1.10.12 sends them on the rig)."""

from __future__ import annotations

import pytest

from ari_push.call_events import ChannelDestroyed, ChannelLeftBridge, ChannelStateChange, StasisStart
from ari_push.channels import DIALED, ChannelRole
from ari_push.esl_frames import EslEvent
from ari_push.freeswitch_pbx import FreeswitchEvents, live_contacts


def event(name: str, uuid: str = "a-1", body: str = "", **headers: str) -> EslEvent:
    fields = [("Event-Name", name), ("Unique-ID", uuid)] if uuid else [("Event-Name", name)]
    return EslEvent(tuple(fields + [(k.replace("__", "-"), v) for k, v in headers.items()]), body)


CALLER_PARK = dict(variable_ari_push="1", variable_push_target="3000", Caller__Context="ari-push",
                   Caller__Caller__ID__Number="3001", Caller__Caller__ID__Name="Alice")


def test_the_callers_park_is_its_stasis_start_once() -> None:
    t = FreeswitchEvents()
    ev = t.translate(event("CHANNEL_PARK", **CALLER_PARK))
    assert isinstance(ev, StasisStart) and ev.args == ("3000",)
    assert ev.channel.caller_number == "3001" and ev.channel.caller_name == "Alice"
    assert ev.channel.role is ChannelRole.CALLER
    assert t.contexts["a-1"] == "ari-push"
    # back in park after a bridge: not a new call
    assert t.translate(event("CHANNEL_PARK", **CALLER_PARK)) is None


def test_push_timeout_becomes_the_timeout_argument() -> None:
    ev = FreeswitchEvents().translate(event("CHANNEL_PARK", variable_push_timeout="45", **CALLER_PARK))
    assert isinstance(ev, StasisStart) and ev.args == ("3000", "timeout=45")


def test_a_park_without_ari_push_is_not_ours() -> None:
    t = FreeswitchEvents()
    assert t.translate(event("CHANNEL_PARK", variable_push_target="3000")) is None
    assert t.translate(event("CHANNEL_PARK", variable_ari_push="1")) is None


def test_an_answered_leg_parks_as_dialed() -> None:
    ev = FreeswitchEvents().translate(event("CHANNEL_PARK", "ap-leg", variable_ari_push_leg="1",
                                            variable_ari_push_caller="a-1"))
    assert isinstance(ev, StasisStart) and ev.args == (DIALED, "a-1") and ev.channel.state == "Up"


@pytest.mark.parametrize("cause, code", [("USER_BUSY", 17), ("CALL_REJECTED", 21), ("NORMAL_CLEARING", 16),
                                         ("ORIGINATOR_CANCEL", 487), ("SOMETHING_NEW", 0)])
def test_hangup_carries_the_q850_cause(cause: str, code: int) -> None:
    t = FreeswitchEvents()
    t.translate(event("CHANNEL_PARK", **CALLER_PARK))
    ev = t.translate(event("CHANNEL_HANGUP", Hangup__Cause=cause))
    assert ev == ChannelDestroyed("a-1", code, cause)
    assert "a-1" not in t.taken and "a-1" not in t.contexts


def test_progress_answer_unbridge() -> None:
    t = FreeswitchEvents()
    assert t.translate(event("CHANNEL_PROGRESS", "ap-leg")) == ChannelStateChange("ap-leg", "Ringing")
    assert t.translate(event("CHANNEL_PROGRESS_MEDIA", "ap-leg")) == ChannelStateChange("ap-leg", "Ringing")
    assert t.translate(event("CHANNEL_ANSWER", "ap-leg")) == ChannelStateChange("ap-leg", "Up")
    assert t.translate(event("CHANNEL_UNBRIDGE", "ap-leg")) == ChannelLeftBridge("ap-leg")
    assert t.translate(event("HEARTBEAT", "")) is None


def test_a_failed_originate_job_ends_its_leg() -> None:
    t = FreeswitchEvents()
    failed = event("BACKGROUND_JOB", "", body="-ERR USER_BUSY\n", Job__UUID="ap-0123")
    assert t.translate(failed) == ChannelDestroyed("ap-0123", 17, "USER_BUSY")
    assert t.translate(event("BACKGROUND_JOB", "", body="+OK ap-0123\n", Job__UUID="ap-0123")) is None
    assert t.translate(event("BACKGROUND_JOB", "", body="-ERR X\n", Job__UUID="someone-elses")) is None


def _reg(user: str, call_id: str, port: int, expsecs: int) -> str:
    return (f"<registration><call-id>{call_id}</call-id><user>{user}@127.0.0.1</user>"
            f"<contact>&quot;&quot; &lt;sip:{user}@127.0.0.1:{port};transport=udp;pn-provider=fcm&gt;</contact>"
            f"<agent>ua</agent><status>Registered(UDP)(unknown) exp(2026-12-01 21:33:29) expsecs({expsecs})</status>"
            "</registration>")


def test_live_contacts_keep_the_newest_per_call_id() -> None:
    xml = ('<?xml version="1.0" encoding="ISO-8859-1"?><profile><registrations>'
           + _reg("3000", "c1@ua", 5001, 120) + _reg("3000", "c1@ua", 5002, 359)  # woke on a new port
           + _reg("3000", "c2@ua", 5003, 200)  # a second device
           + _reg("3001", "c9@ua", 5009, 300)  # another user
           + "</registrations></profile>")
    assert live_contacts(xml, "3000") == ["sip:3000@127.0.0.1:5002;transport=udp;pn-provider=fcm",
                                          "sip:3000@127.0.0.1:5003;transport=udp;pn-provider=fcm"]
    assert live_contacts(xml, "3002") == []


def test_live_contacts_registered_within_one_second_are_all_kept() -> None:
    xml = ("<profile><registrations>" + _reg("3000", "c1@ua", 5001, 300) + _reg("3000", "c1@ua", 5002, 300)
           + "</registrations></profile>")
    assert len(live_contacts(xml, "3000")) == 2


def test_live_contacts_refuse_broken_xml() -> None:
    with pytest.raises(ValueError, match="broken XML"):
        live_contacts("Invalid Profile!", "3000")
