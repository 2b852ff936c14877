"""A burst of registrations overflows the capture queue: what was dropped is read back from
Asterisk (PJSIPShowContacts) once the queue drains, and waiting calls are told (a GAP).

The AMI server is the replay fake (our real AmiClient speaks to it); the queue limit is made
small so a burst of 40 events overflows it.
"""

from __future__ import annotations

import asyncio

import pytest

from ari_push import capture as capture_module
from ari_push.ami import AmiClient
from ari_push.ami_frames import parse_block
from ari_push.bindings import MemoryStore
from ari_push.capture import Capture
from ari_push.contacts import ContactPolicy
from ari_push.metrics import Metrics
from ari_push.settings import AmiSettings, Secret
from ari_push.wakeups import GAP, WakeupHub
from tests.conftest import wait_for
from tests.fakes.ami_replay import AmiReplay
from tests.fakes.builders import fcm_token

AORS = [str(5000 + i) for i in range(40)]


def uri(aor: str) -> str:
    return f"sip:{aor}@127.0.0.1:5060;pn-provider=fcm;pn-prid={fcm_token(aor)};pn-param=proj-a"


def contact_status(aor: str) -> str:
    return (f"Event: ContactStatus\r\nPrivilege: system,all\r\nURI: {uri(aor)}\r\nContactStatus: Created\r\n"
            f"AOR: {aor}\r\nEndpointName: {aor}\r\n")


def show_contacts() -> str:
    out = "Response: Success\nActionID: {id}\nEventList: start\nMessage: A listing of Contacts follows\n\n"
    for aor in AORS:
        out += (f"Event: ContactList\nActionID: {{id}}\nObjectType: contact\nObjectName: {aor};@x\n"
                f"Aor: {aor}\nEndpoint: {aor}\nUri: {uri(aor)}\nUserAgent: phone\n\n")
    return out + "Event: ContactListComplete\nActionID: {id}\nEventList: Complete\nListItems: 40\n\n"


async def test_dropped_registrations_are_read_back_and_waiting_calls_told(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture_module, "QUEUE_LIMIT", 2)
    replay = AmiReplay()
    replay.replies["PJSIPShowContacts"] = show_contacts()
    await replay.start()
    store, hub = MemoryStore(), WakeupHub()
    capture: Capture
    ami = AmiClient(AmiSettings(port=replay.port, secret=Secret("s"), heartbeat=5),
                    on_event=lambda m: capture.on_ami_event(m))
    capture = Capture(store, hub, ContactPolicy(), ami, Metrics())
    stop = asyncio.Event()
    ami_task = asyncio.create_task(ami.run(stop))
    tasks = [ami_task]
    try:
        assert await ami.link.wait_up(10)
        with hub.watch(AORS[-1]) as watch:
            for aor in AORS:  # the burst arrives before any worker runs: 4 shards of 2 slots
                capture.on_ami_event(parse_block(contact_status(aor)))
            assert capture.dropped >= 40 - 8 and capture.resync_needed
            tasks.append(asyncio.create_task(capture.run(stop)))

            async def all_stored() -> bool:
                return all([await store.bindings_for(a) for a in AORS])

            await wait_for(all_stored, 10, "every registration stored, the dropped ones read back")
            await wait_for(lambda: not capture.resync_needed, 10, "the read-back done")
            items = []
            while not watch.queue.empty():
                items.append(watch.queue.get_nowait())
            assert GAP in items  # a call waiting on this AOR re-reads its contacts
        assert [a for a in replay.actions if a.get("Action") == "PJSIPShowContacts"]
    finally:
        stop.set()
        try:
            for t in tasks:
                await asyncio.wait_for(t, 10)
        finally:
            await replay.stop()
