"""Token capture from FreeSWITCH: sofia registration events over the event socket -> the same
contact parser, binding store and "registered" signal as the Asterisk capture (capture.py).

Feeds (docs/freeswitch.md):
- ``sofia::register`` (sent for every REGISTER that refreshes or creates a registration, the same
  contact URI included): the ``contact`` header's URI is parsed and, when it carries push
  parameters, stored; waiting calls of that user are woken at once.
- ``sofia::unregister`` and ``sofia::expire`` never delete a binding (a sleeping phone's
  registration expires; its token stays valid), as Asterisk's ``Removed`` does not.
- Resynchronisation with ``sofia xmlstatus profile <p> reg`` on every (re)connect (and, with
  ``run(resync_interval=...)``, periodically).
Only the configured sofia profile is captured: calls are originated through it.

A FreeSWITCH user is stored under its directory user id (``3000``), the domain left out: the
call flow takes the same plain AOR names as on Asterisk (``push_target`` in the dialplan). One
ari-push serves one directory domain per profile (docs/freeswitch.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import xml.etree.ElementTree as ET
from typing import Protocol

from ari_push.capture import Capture, EventShards
from ari_push.esl import EslError
from ari_push.esl_frames import EslEvent
from ari_push.model import Binding

log = logging.getLogger("ari_push.fs_capture")

REGISTER = "sofia::register"
GONE = frozenset({"sofia::unregister", "sofia::expire"})


class EslCommands(Protocol):
    async def api(self, command: str) -> str: ...


def sofia_contact_uri(contact: str) -> str:
    """The URI of a sofia ``contact``: ``"" <sip:3000@10.0.0.5:5060;pn-prid=...>`` gives what is
    inside the angle brackets; a bare ``sip:...`` is returned as it is; a broken one gives ''."""
    text = contact.strip()
    start = text.find("<")
    if start < 0:
        return text if ":" in text and " " not in text else ""
    end = text.find(">", start)
    return text[start + 1 : end].strip() if end > start else ""


def user_id(user: str) -> str:
    """The binding's AOR for a FreeSWITCH directory user: the user id, without ``@domain``."""
    return user.strip().partition("@")[0].strip()


class FreeswitchCapture:
    """Feeds sofia events and the registration table into ``Capture.capture``."""

    def __init__(self, capture: Capture, esl: EslCommands, profile: str) -> None:
        self.core = capture
        self.esl = esl
        self.profile = profile
        self.shards: EventShards[EslEvent] = EventShards(self.handle, self.resync, capture.wakeups.gap,
                                                         "FreeSWITCH")
        self.resyncs = 0
        self.gone = 0  # unregister/expire events handled (a binding is never deleted for one)

    # ---------------------------------------------------------------- feeds

    def on_esl_event(self, event: EslEvent) -> None:
        """Called by the ESL reader for every event; must not block. A new registration wakes the
        calls waiting on this daemon at once, before anything is stored or published."""
        if event.subclass != REGISTER and event.subclass not in GONE:
            return
        if event.get("profile-name") != self.profile:
            return
        aor = self._aor(event)
        if event.subclass == REGISTER and aor:
            uri = sofia_contact_uri(event.get("contact"))
            if uri:
                self.core.deliver_now(aor, uri)
        self.shards.put(aor, event)

    @staticmethod
    def _aor(event: EslEvent) -> str:
        return user_id(event.get("username") or event.get("from-user"))

    async def run(self, stop: asyncio.Event, resync_interval: float = 0.0) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.shards.run(stop))
            if resync_interval > 0:
                tg.create_task(self._periodic(stop, resync_interval))

    async def _periodic(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
                    return
            await self.resync_quietly()

    async def handle(self, event: EslEvent) -> Binding | None:
        aor = self._aor(event)
        if event.subclass in GONE:
            # the registration is gone; the device's token is not (docs/freeswitch.md)
            self.gone += 1
            log.debug("%s of %s: binding kept", event.subclass, aor)
            return None
        uri = sofia_contact_uri(event.get("contact"))
        if not aor or not uri:
            log.warning("sofia::register without a usable user or contact (user %r)", aor)
            return None
        return await self.core.capture(aor, aor, uri, event.get("user-agent"), delivered=True)

    async def resync(self) -> int:
        """Read every registration of the profile and store what carries push parameters."""
        text = await self.esl.api(f"sofia xmlstatus profile {self.profile} reg")
        if not text.lstrip().startswith("<"):
            raise EslError(f"sofia profile {self.profile!r} not found on FreeSWITCH "
                           f"(check [freeswitch] profile): {text.strip()[:80]}")
        try:
            # The document comes from the configured FreeSWITCH over its authenticated socket.
            root = ET.fromstring(text)  # noqa: S314
        except ET.ParseError as exc:
            raise EslError(f"sofia xmlstatus answered with broken XML: {exc}") from None
        regs = root.findall("./registrations/registration")
        stored = 0
        for reg in regs:
            aor = user_id(reg.findtext("user", ""))
            uri = sofia_contact_uri(reg.findtext("contact", ""))
            if await self.core.capture(aor, aor, uri, reg.findtext("agent", ""), signal=False):
                stored += 1
        self.resyncs += 1
        log.info("resynchronised %d registrations from FreeSWITCH profile %s, %d with push parameters",
                 len(regs), self.profile, stored)
        return stored

    async def resync_quietly(self) -> None:
        try:
            await self.resync()
        except Exception as exc:  # best effort; events keep flowing
            log.warning("FreeSWITCH registration resync failed: %s", exc)
