"""What the FreeSWITCH call take-over adapter will need, measured on the real FreeSWITCH 1.10.12
of the rig (docs/freeswitch.md, "Call take-over"). Not part of the tests; not the product's
call flow: the ESL commands are issued by hand, through the product's ESL link (ari_push/esl.py).

    ARI_PUSH_RIG_SLOT=N .venv/bin/python bench/freeswitch_probe.py [--rounds 10]

Measures, with our SIP phone (rig/sipua.py, digest auth) and a caller:
  wake      re-REGISTER sent by the woken phone -> sofia::register at the daemon -> INVITE at the
            phone (originate to the exact contact), for a new URI (new socket) and the same URI
  answer    caller INVITE -> CHANNEL_PARK (ring_ready + park) and -> 200 OK after uuid_bridge
  audio     RTP both ways through the bridge; caller BYE -> BYE at the phone
  handback  uuid_setvar push_status + uuid_transfer back to the dialplan (the TIMEOUT path)
  cancel    caller CANCEL while parked -> CHANNEL_HANGUP at the daemon
  parked    a parked call with park_timeout and no daemon: what the caller gets, and when
  stale     registrations FreeSWITCH keeps for the user after a new-URI wake
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ari_push.esl import EslClient
from ari_push.esl_frames import EslEvent
from ari_push.settings import FreeswitchSettings, Secret
from rig.freeswitch import ESL_PASSWORD, PROFILE, SIP_PASSWORD, FreeswitchInstance, FsPorts
from rig.sipua import SipUA

PARK_TIMEOUT_PROBE = """
      <extension name="park_timeout_probe">
        <condition field="destination_number" expression="^park-probe$">
          <action application="set" data="park_timeout=2"/>
          <action application="ring_ready"/>
          <action application="park"/>
          <action application="log" data="NOTICE after-park-continued push_status=${push_status}"/>
          <action application="hangup" data="NORMAL_TEMPORARY_FAILURE"/>
        </condition>
      </extension>
      <extension name="socket_probe">
        <condition field="destination_number" expression="^socket-probe$">
          <action application="socket" data="127.0.0.1:9 async full"/>
          <action application="log" data="NOTICE after-socket-continued"/>
          <action application="hangup" data="NORMAL_TEMPORARY_FAILURE"/>
        </condition>
      </extension>
"""
EVENTS = ("CHANNEL_PARK", "CHANNEL_ANSWER", "CHANNEL_HANGUP", "BACKGROUND_JOB",
          "CUSTOM", "sofia::register", "sofia::unregister", "sofia::expire")
FCM = "pn-provider=fcm;pn-prid=cAbCdEf123:APA91bHxyz-_AbC_xyz-123;pn-param=my-project-id"


class Probe:
    def __init__(self, fs: FreeswitchInstance) -> None:
        self.fs = fs
        self.events: asyncio.Queue[tuple[float, EslEvent]] = asyncio.Queue()
        settings = FreeswitchSettings(port=fs.ports.esl, password=Secret(ESL_PASSWORD), profile=PROFILE)
        self.esl = EslClient(settings, on_event=lambda ev: self.events.put_nowait((time.monotonic(), ev)),
                             events=EVENTS)

    async def event(self, match, timeout: float = 10.0) -> tuple[float, EslEvent]:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            while True:
                at, ev = await self.events.get()
                if match(ev):
                    return at, ev

    def drain(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()


def parked_for(event: EslEvent, user: str) -> bool:
    return event.name == "CHANNEL_PARK" and event.get("variable_push_target") == user


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def summary(values: list[float]) -> dict[str, float]:
    """Milliseconds for the timings, packet counts for rtp_*."""
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2), "n": len(values)}


async def one_call(p: Probe, callee: SipUA, caller: SipUA, same_uri: bool) -> dict[str, float]:
    user = callee.user
    p.drain()
    t_call = time.monotonic()
    call = caller.start_call(user, timeout=30)
    t_park, park = await p.event(lambda e: parked_for(e, user))
    a_leg = park.uuid
    # the push would go out here; the phone wakes
    if not same_uri:
        await callee.open()
    t_reg = time.monotonic()
    reg_task = asyncio.create_task(callee.register(FCM))
    t_ev, ev = await p.event(lambda e: e.subclass == "sofia::register" and e.get("username") == user)
    contact = ev.get("contact")
    uri = contact[contact.index("<") + 1: contact.index(">")]
    b_leg = str(uuid.uuid4())
    job = await p.esl.send(f"bgapi originate {{origination_uuid={b_leg},ignore_early_media=true,"
                           f"originate_timeout=20}}sofia/{PROFILE}/{uri} &park()")
    assert job.ok, job.reply_text
    async with asyncio.timeout(10):
        invite = await callee.invites.get()
    t_inv = invite.received
    await reg_task
    await p.event(lambda e: e.name == "CHANNEL_ANSWER" and e.uuid == b_leg)
    # the caller is answered once the phone has: uuid_bridge on an unanswered, ringing A-leg fails
    # (FreeSWITCH swaps the legs and hangs A up with DESTINATION_OUT_OF_ORDER; measured)
    answered = await p.esl.api(f"uuid_answer {a_leg}")
    assert answered.startswith("+OK"), answered
    bridged = await p.esl.api(f"uuid_bridge {a_leg} {b_leg}")
    assert bridged.startswith("+OK"), bridged
    answer = await call
    t_ans = time.monotonic()
    assert answer.status == 200, answer.status
    # audio both ways through FreeSWITCH
    assert caller.rtp is not None and callee.rtp is not None
    await asyncio.gather(caller.rtp.send_for(1.0), callee.rtp.send_for(1.0))
    await asyncio.sleep(0.2)
    audio = (caller.rtp.received, callee.rtp.received)
    t_bye = time.monotonic()
    assert await caller.hangup() == 200
    async with asyncio.timeout(10):
        await callee.byes.get()
    t_bye_phone = time.monotonic()
    await p.event(lambda e: e.name == "CHANNEL_HANGUP" and e.uuid == b_leg)
    return {"register_to_event": ms(t_ev - t_reg), "register_to_invite": ms(t_inv - t_reg),
            "invite_to_park": ms(t_park - t_call), "invite_to_answer": ms(t_ans - t_call),
            "bye_to_phone_bye": ms(t_bye_phone - t_bye), "rtp_at_caller": audio[0], "rtp_at_phone": audio[1]}


async def main(rounds: int, multiple_registrations: str) -> dict[str, object]:
    fs = FreeswitchInstance.provisioned("probe", FsPorts.for_index(5), extra_dialplan=PARK_TIMEOUT_PROBE,
                                        multiple_registrations=multiple_registrations)
    fs.write_config()
    t0 = time.monotonic()
    fs.start()
    out: dict[str, object] = {"freeswitch_ready_s": round(time.monotonic() - t0, 2),
                              "multiple_registrations": multiple_registrations}
    p = Probe(fs)
    stop = asyncio.Event()
    link = asyncio.create_task(p.esl.run(stop))
    try:
        await p.esl.link.wait_up(15)
        caller = SipUA("3101", fs.ports.sip, password=SIP_PASSWORD)
        await caller.open()
        for same_uri in (False, True):
            callee = SipUA("3100", fs.ports.sip, password=SIP_PASSWORD)
            await callee.open()
            assert await callee.register(FCM) == 200
            rows = []
            for _ in range(rounds):
                if not same_uri:
                    callee.close()  # asleep: the socket is gone
                rows.append(await one_call(p, callee, caller, same_uri))
            key = "same_uri" if same_uri else "new_uri"
            out[key] = {k: summary([r[k] for r in rows]) for k in rows[0]}
            if not same_uri:
                xml = await p.esl.api(f"sofia xmlstatus profile {PROFILE} reg")
                regs = [r for r in ET.fromstring(xml).findall("./registrations/registration")
                        if r.findtext("user", "").startswith("3100@")]
                out["stale"] = {"registrations_kept_for_user_after_new_uri_wakes": len(regs), "wakes": rounds}
            with contextlib.suppress(Exception):
                await callee.unregister()
            callee.close()

        # handback: the phone never wakes; the daemon sets push_status and returns the call
        sleeper = SipUA("3102", fs.ports.sip, password=SIP_PASSWORD)
        await sleeper.open()
        assert await sleeper.register(FCM) == 200
        sleeper.close()
        p.drain()
        call = caller.start_call("3102", timeout=30)
        _, park = await p.event(lambda e: parked_for(e, "3102"))
        t_hb = time.monotonic()
        await p.esl.api(f"uuid_setvar {park.uuid} push_status TIMEOUT")
        await p.esl.api(f"uuid_transfer {park.uuid} push-done XML ari-push")
        final = await call
        await asyncio.sleep(0.3)
        out["handback"] = {"caller_final_status": final.status, "ms": ms(time.monotonic() - t_hb - 0.3),
                           "dialplan_saw_push_status": "push_status=TIMEOUT" in fs.log_text()}

        # cancel: the caller gives up while parked
        p.drain()
        call = caller.start_call("3102", timeout=30)
        _, park = await p.event(lambda e: parked_for(e, "3102"))
        t_c = time.monotonic()
        await caller.cancel()
        at, hup = await p.event(lambda e: e.name == "CHANNEL_HANGUP" and e.uuid == park.uuid)
        out["cancel"] = {"cancel_to_hangup_event_ms": ms(at - t_c), "cause": hup.get("Hangup-Cause")}
        with contextlib.suppress(Exception):
            await call

        # parked with park_timeout and nobody controlling it
        t_p = time.monotonic()
        final = await caller.call("park-probe", timeout=30)
        out["park_timeout"] = {"park_timeout_s": 2, "caller_final_status": final.status,
                               "after_s": round(time.monotonic() - t_p, 2),
                               "dialplan_continued_after_park": "after-park-continued" in fs.log_text()}

        # the outbound `socket` application with nobody listening (daemon down)
        t_s = time.monotonic()
        final = await caller.call("socket-probe", timeout=30)
        out["socket_app_daemon_down"] = {"caller_final_status": final.status,
                                         "after_ms": ms(time.monotonic() - t_s),
                                         "dialplan_continued_after_socket": "after-socket-continued" in fs.log_text()}
        caller.close()
    finally:
        stop.set()
        await link
        fs.stop()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--multiple-registrations", default="contact", choices=("contact", "true", "false"))
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.rounds, args.multiple_registrations)), indent=2))
