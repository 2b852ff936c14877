"""The FreeSWITCH adapter's pure parts: ESL channel events -> the flow's typed events, and the live
contacts read from `sofia xmlstatus` (shapes as FreeSWITCH 1.10.12 sends them on the rig)."""

from __future__ import annotations

import json

import pytest

from ari_push.call_events import ChannelDestroyed, ChannelLeftBridge, ChannelStateChange, StasisStart
from ari_push.channels import DIALED, ChannelRole
from ari_push.esl_frames import EslEvent, EslMessage
from ari_push.freeswitch_pbx import FreeswitchEvents, FreeswitchPbx, live_contacts


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


def test_the_call_id_base_comes_with_the_park() -> None:
    """FreeSWITCH's Core-UUID is in every event: a call's id never depends on whether the
    daemon had read the PBX's id yet, so two daemons agree on it (the push ledger keys on it)."""
    ev = FreeswitchEvents().translate(event("CHANNEL_PARK", Core__UUID="fs-core-1", **CALLER_PARK))
    assert isinstance(ev, StasisStart) and ev.pbx_id == "fs-core-1"


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


def test_clustered_a_leg_of_another_daemon_is_not_ours() -> None:
    """Every daemon on one FreeSWITCH sees every park: a leg another member originated is left alone
    (not taken as an orphan to hang up)."""
    t = FreeswitchEvents(owner="ari-push-a")
    mine = t.translate(event("CHANNEL_PARK", "ap-1", variable_ari_push_leg="1", variable_ari_push_caller="a-1",
                             variable_ari_push_owner="ari-push-a"))
    assert isinstance(mine, StasisStart) and mine.args == (DIALED, "a-1")
    theirs = t.translate(event("CHANNEL_PARK", "ap-2", variable_ari_push_leg="1", variable_ari_push_caller="a-2",
                               variable_ari_push_owner="ari-push-b"))
    assert theirs is None


class FakeEsl:
    """Answers `api` commands from a table, as FreeSWITCH would (the adapter's reads only)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    async def api(self, command: str) -> str:
        return self.answers.get(command, "_undef_")

    async def send(self, command: str, headers: tuple[tuple[str, str], ...] = ()) -> EslMessage:
        raise AssertionError(f"unexpected {command}")


async def test_channels_are_told_by_their_variables_not_the_last_application() -> None:
    """After ari-push's ``ring_ready`` the caller's application column reads ``ring_ready``, not
    ``park``; a caller already handed back (``push_status`` set) is no longer waiting."""
    rows = [{"uuid": u, "application": app, "callstate": state, "created_epoch": "0", "cid_num": "3001",
             "cid_name": ""} for u, app, state in
            [("c-1", "ring_ready", "RINGING"), ("c-2", "park", "RINGING"), ("l-1", "", "DIALING"),
             ("x-1", "echo", "ACTIVE")]]
    esl = FakeEsl({
        "show channels as json": json.dumps({"row_count": len(rows), "rows": rows}),
        "uuid_getvar c-1 ari_push": "1", "uuid_getvar c-1 push_target": "3000",
        "uuid_getvar c-2 ari_push": "1", "uuid_getvar c-2 push_target": "3000",
        "uuid_getvar c-2 push_status": "TIMEOUT",
        "uuid_getvar l-1 ari_push_caller": "c-1", "uuid_getvar l-1 ari_push_leg": "1",
        "uuid_getvar c-1 ari_push_owner": "ari-push-a", "uuid_getvar l-1 ari_push_owner": "ari-push-b",
    })
    found = {c.id: c for c in await FreeswitchPbx(esl, "internal").channels()}
    assert found["c-1"].role is ChannelRole.CALLER and found["c-1"].args == "3000"
    assert found["c-2"].args == "" and found["x-1"].args == ""
    assert found["l-1"].role is ChannelRole.LEG and found["l-1"].args == f"{DIALED},c-1"
    assert await FreeswitchPbx(esl, "internal").app_channel_ids() == {"c-1", "l-1"}
    assert await FreeswitchPbx(esl, "internal", owner="ari-push-a").app_channel_ids() == {"c-1"}
