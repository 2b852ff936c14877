"""The chan_sip path (Asterisk <= 20): PeerStatus Registered -> DBGet SIP/Registry/<peer>.

No chan_sip Asterisk can run here: a replay server answers our real AMI client with the
documented chan_sip-era wire text (docs/capture.md).
"""

from __future__ import annotations

import asyncio

from ari_push.ami import AmiClient
from ari_push.bindings import MemoryStore
from ari_push.capture import Capture
from ari_push.contacts import ContactPolicy
from ari_push.metrics import Metrics
from ari_push.settings import AmiSettings, Secret
from ari_push.wakeups import Registration, WakeupHub
from tests.conftest import wait_for
from tests.fakes.ami_replay import AmiReplay

TOKEN = "5c1a" + "0" * 56 + "6d7c"
CONTACT = (f"sip:1001@192.168.1.10:5060;app-id=org.linphone.phone.voip.prod;pn-type=apple;pn-tok={TOKEN};"
           "pn-silent=1")
DBGET = (
    "Response: Success\nActionID: {id}\nEventList: start\nMessage: Result will follow\n\n"
    "Event: DBGetResponse\nFamily: SIP/Registry\nKey: 1001\n"
    f"Val: 192.168.1.10:5060:3600:1001:{CONTACT}\nActionID: {{id}}\n\n"
    "Event: DBGetComplete\nActionID: {id}\nEventList: Complete\nListItems: 1\n\n"
)
PEER_REGISTERED = ("Event: PeerStatus\nPrivilege: system,all\nChannelType: SIP\nPeer: SIP/1001\n"
                   "PeerStatus: Registered\nAddress: 192.168.1.10:5060\n\n")


async def _run(replay: AmiReplay) -> tuple[MemoryStore, WakeupHub, Capture, AmiClient]:
    store = MemoryStore()
    hub = WakeupHub()
    capture: Capture
    ami = AmiClient(AmiSettings(port=replay.port, secret=Secret("s"), heartbeat=5),
                    on_event=lambda m: capture.on_ami_event(m))
    capture = Capture(store, hub, ContactPolicy(), ami, Metrics())
    return store, hub, capture, ami


async def test_peerstatus_registered_reads_astdb_and_stores_the_binding() -> None:
    replay = AmiReplay()
    replay.replies["DBGet"] = DBGET
    await replay.start()
    store, hub, capture, ami = await _run(replay)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(ami.run(stop)), asyncio.create_task(capture.run(stop))]
    try:
        assert await ami.link.wait_up(5)
        with hub.watch("1001") as watch:
            replay.emit(PEER_REGISTERED)
            reg: Registration = await asyncio.wait_for(watch.queue.get(), 5)
        assert reg.contact_uri == CONTACT and reg.device_id
        await wait_for(lambda: store.bindings_for("1001"), 10, "the binding stored")
        [binding] = await store.bindings_for("1001")
        assert binding.push.provider == "apns" and binding.push.token == TOKEN
        assert binding.push.param == "org.linphone.phone.voip" and not binding.push.sandbox
        assert binding.contact_uri == CONTACT
        dbget = [a for a in replay.actions if a.get("Action") == "DBGet"]
        assert dbget and dbget[0]["Family"] == "SIP/Registry" and dbget[0]["Key"] == "1001"
    finally:
        stop.set()
        try:
            for t in tasks:
                await asyncio.wait_for(t, 10)  # a crashed AMI or capture task fails the test here
        finally:
            await replay.stop()


async def test_malformed_astdb_value_is_rejected_not_fatal() -> None:
    replay = AmiReplay()
    replay.replies["DBGet"] = DBGET.replace("192.168.1.10:5060:3600:1001:", "garbage-without-fields")
    await replay.start()
    store, _, capture, ami = await _run(replay)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(ami.run(stop)), asyncio.create_task(capture.run(stop))]
    try:
        assert await ami.link.wait_up(5)
        replay.emit(PEER_REGISTERED)
        await wait_for(lambda: any(s.value for m in capture.metrics.rejected.collect() for s in m.samples
                                   if s.name.endswith("_total")), 10, "the rejection counted")
        assert await store.bindings_for("1001") == []
        rejected = {s.labels["reason"]: s.value for m in capture.metrics.rejected.collect() for s in m.samples
                    if s.name.endswith("_total")}
        assert rejected == {"bad-registry": 1.0}
        assert ami.link.up
    finally:
        stop.set()
        try:
            for t in tasks:
                await asyncio.wait_for(t, 10)  # a crashed AMI or capture task fails the test here
        finally:
            await replay.stop()


async def test_pjsip_peerstatus_reachable_is_not_a_registration() -> None:
    replay = AmiReplay()
    await replay.start()
    _, _, capture, _ = await _run(replay)
    msg = ("Event: PeerStatus\nPrivilege: system,all\nChannelType: PJSIP\nPeer: PJSIP/1001\n"
           "PeerStatus: Reachable\n\n")
    from ari_push.ami_frames import parse_block

    assert await capture.handle(parse_block(msg.replace("\n", "\r\n").strip())) is None
    assert not [a for a in replay.actions if a.get("Action") == "DBGet"]
    await replay.stop()
