"""Capture on a qualified AOR: the qualify state goes to the call flow, and the Reachable that
follows a new contact's NonQualified is not captured twice."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ari_push.ami_frames import AmiMessage
from ari_push.bindings import MemoryStore
from ari_push.capture import AGENT_KEPT, RECAPTURE_AFTER, Capture
from ari_push.contacts import ContactPolicy
from ari_push.metrics import Metrics
from ari_push.pbx import ContactDetails
from ari_push.qualify import ContactReach, Reach
from ari_push.wakeups import WakeupHub

URI = "sip:1001@10.0.0.6:5060;transport=udp;pn-provider=fcm;pn-prid=" + "t" * 40 + ";pn-param=proj"


def status(value: str, uri: str = URI) -> AmiMessage:
    return AmiMessage((("Event", "ContactStatus"), ("URI", uri), ("ContactStatus", value), ("AOR", "1001"),
                       ("EndpointName", "1001")))


async def test_reachable_right_after_a_new_contact_is_not_captured_again() -> None:
    now = [1000.0]
    store, metrics = MemoryStore(), Metrics()
    capture = Capture(store, WakeupHub(), ContactPolicy(), None, metrics, clock=lambda: now[0])
    reach = ContactReach()
    capture.on_contact_status = reach.on_status
    for value in ("NonQualified", "Reachable"):
        msg = status(value)
        capture.on_ami_event(msg)
        await capture.handle(msg)
    assert reach.of(URI) is Reach.REACHABLE
    assert metrics.registrations.labels("rfc8599")._value.get() == 1  # one capture, not two
    msg = status("Unreachable")
    capture.on_ami_event(msg)
    assert await capture.handle(msg) is None and reach.of(URI) is Reach.UNREACHABLE
    now[0] += RECAPTURE_AFTER + 1  # the phone answers OPTIONS again, long after: a registration
    msg = status("Reachable")
    capture.on_ami_event(msg)
    assert await capture.handle(msg) is not None
    assert metrics.registrations.labels("rfc8599")._value.get() == 2 and reach.of(URI) is Reach.REACHABLE
    capture.on_ami_event(status("Removed"))
    assert reach.of(URI) is Reach.UNKNOWN


async def test_a_device_user_agent_is_read_once_an_hour_not_on_every_registration() -> None:
    now = [1000.0]
    reads: list[str] = []
    store = MemoryStore()
    capture = Capture(store, WakeupHub(), ContactPolicy(), None, Metrics(), clock=lambda: now[0])

    handed: list[float | None] = []

    async def details_of(aor: str, uri: str) -> ContactDetails:
        reads.append(uri)
        return ContactDetails("Linphone/5.2", now[0] + 600)

    capture.contact_of = details_of
    capture.on_binding = lambda binding, fresh, expires: handed.append(expires)
    for port in (5060, 5061, 5062):  # the app wakes on a new port each time: a new contact
        b = await capture.capture("1001", "1001", URI.replace(":5060", f":{port}"), "")
        assert b is not None and b.user_agent == "Linphone/5.2"
    assert len(reads) == 1
    # the one read's expiration goes on (the refresh needs no read of its own); later ones: unknown
    assert handed == [1600.0, None, None]
    now[0] += AGENT_KEPT + 1
    await capture.capture("1001", "1001", URI.replace(":5060", ":5063"), "")
    assert len(reads) == 2  # an app upgrade shows within the hour
    assert (await store.bindings_for("1001"))[0].user_agent == "Linphone/5.2"


def listed(uri: str, expires: int) -> AmiMessage:
    return AmiMessage((("Event", "ContactList"), ("ObjectName", "1001;@x"), ("Aor", "1001"), ("Endpoint", "1001"),
                       ("Uri", uri), ("UserAgent", "Linphone/5.2"), ("ExpirationTime", str(expires)),
                       ("Status", "NonQualified")))


class Listing:
    """AMI's PJSIPShowContacts as the resync reads it; ``meanwhile`` runs while it is read."""

    def __init__(self, rows: list[AmiMessage], meanwhile: Callable[[], Awaitable[object]] | None = None) -> None:
        self.rows, self.meanwhile = rows, meanwhile

    async def action_list(self, name: str, **params: str) -> list[AmiMessage]:
        assert name == "PJSIPShowContacts"
        if self.meanwhile is not None:
            await self.meanwhile()
        return self.rows


async def test_a_resync_leaves_a_device_woken_on_a_new_port_with_its_newest_contact() -> None:
    old, new = URI, URI.replace(":5060", ":5071")  # the old contact lingers until it expires
    store = MemoryStore()
    capture = Capture(store, WakeupHub(), ContactPolicy(), None, Metrics())
    capture.ami = Listing([listed(new, 2000), listed(old, 1500)])  # Asterisk lists them in any order
    await capture.resync()
    (b,) = await store.bindings_for("1001")
    assert b.contact_uri == new


async def test_a_resync_does_not_undo_a_registration_made_while_it_read_the_contacts() -> None:
    old, new = URI, URI.replace(":5060", ":5071")
    store = MemoryStore()
    capture = Capture(store, WakeupHub(), ContactPolicy(), None, Metrics())
    # the listing was taken before the phone woke on a new port, which was captured live meanwhile
    capture.ami = Listing([listed(old, 1500)], meanwhile=lambda: capture.capture("1001", "1001", new, "ua"))
    await capture.resync()
    (b,) = await store.bindings_for("1001")
    assert b.contact_uri == new
