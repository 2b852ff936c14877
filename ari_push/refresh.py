"""Registration-refresh pushes: wake a sleeping app shortly before its contact expires.

RFC 8599's ``sip.pnsreg`` idea (docs/reachability.md). Asterisk says nothing when a contact
is refreshed with the same URI, so expiration times are *read*: one ARI lookup per new
registration (exact lifetime), one ``PJSIPShowContacts`` every ``sync_interval`` (catches
everything else, and rebuilds the embedded schedule after a restart), and one lookup per
entry when it falls due. Three tasks in all, whatever the number of devices:

* ``_observer``: registrations handed over by capture -> lookup -> schedule;
* ``_ticker``: every ``tick`` s, claim due entries from the shared schedule and work them
  (push, or judge a pushed one: re-registered or expired anyway);
* ``_syncer``: the periodic full read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from ari_push.ami_frames import AmiMessage
from ari_push.ari import AriError
from ari_push.bindings import BindingStore, StoreUnavailable
from ari_push.channels import contact_object_id
from ari_push.contacts import ContactPolicy, ContactRejected, parse_contact
from ari_push.metrics import Metrics
from ari_push.model import Binding, PushKind, PushMessage, PushOutcome, PushResult, mask
from ari_push.refresh_store import SAME_EXPIRY, RefreshSchedule, Seen, Watch
from ari_push.settings import RefreshSettings

log = logging.getLogger("ari_push.refresh")

QUEUE_LIMIT = 10_000
CLAIM_BATCH = 200
CONCURRENCY = 50  # entries worked at once (each is one ARI lookup, maybe one push)
RETRY_AFTER = 5.0  # seconds, when Asterisk could not be asked about a due contact


class ContactReader(Protocol):
    async def expiration(self, aor: str, uri: str) -> float | None:
        """The contact's expiration time (Unix s), or None when Asterisk has no such contact."""
        ...

    async def contacts(self) -> list[tuple[str, str, float]]:
        """Every registered contact: (aor, uri, expiration time)."""
        ...


class Pusher(Protocol):
    def provider_for(self, binding: Binding) -> object | None: ...

    async def send(self, binding: Binding, message: PushMessage) -> PushResult: ...


class AriGet(Protocol):
    async def call(self, operation: str, path_params: dict[str, str] | None = None) -> object: ...


class AmiList(Protocol):
    async def action_list(self, name: str, **params: str) -> list[AmiMessage]: ...


class AsteriskContacts:
    """Reads expiration times from the running Asterisk: ARI for one contact, AMI for all."""

    def __init__(self, ari: AriGet, ami: AmiList) -> None:
        self.ari = ari
        self.ami = ami

    async def expiration(self, aor: str, uri: str) -> float | None:
        try:
            attrs = await self.ari.call("get_config", {"configClass": "res_pjsip", "objectType": "contact",
                                                       "id": contact_object_id(aor, uri)})
        except AriError as exc:
            if exc.status == 404:
                return None
            raise
        for attr in attrs if isinstance(attrs, list) else []:
            if isinstance(attr, dict) and attr.get("attribute") == "expiration_time":
                with contextlib.suppress(TypeError, ValueError):
                    return float(attr.get("value", ""))
        return None

    async def contacts(self) -> list[tuple[str, str, float]]:
        out = []
        for c in await self.ami.action_list("PJSIPShowContacts"):
            if c.event != "ContactList":
                continue
            aor = c.get("Aor") or c.get("ObjectName").partition(";@")[0]
            with contextlib.suppress(ValueError):
                out.append((aor, c.get("Uri"), float(c.get("ExpirationTime"))))
        return out


class RefreshScheduler:
    def __init__(
        self,
        settings: RefreshSettings,
        schedule: RefreshSchedule,
        store: BindingStore,
        contacts: ContactReader,
        pusher: Pusher,
        policy: ContactPolicy,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.schedule = schedule
        self.store = store
        self.contacts = contacts
        self.pusher = pusher
        self.policy = policy
        self.metrics = metrics
        self.clock = clock
        self.queue: asyncio.Queue[tuple[Binding, float, bool, float | None]] = asyncio.Queue(QUEUE_LIMIT)
        self.dropped = 0
        self._sync_now = asyncio.Event()

    # ---------------------------------------------------------------- feeds

    def on_binding(self, binding: Binding, fresh: bool, expires: float | None = None) -> None:
        """Capture's callback: a push contact was (re)registered. Never blocks; when the queue
        is full the next full read finds the contact instead. Contacts read back by capture's
        resync (not fresh) are left to the full read, which has their expiration already.
        ``expires``: the contact's expiration when capture has just read it (no read here then)."""
        if not fresh or not self._wanted(binding):
            return
        try:
            self.queue.put_nowait((binding, self.clock(), fresh, expires))
        except asyncio.QueueFull:
            self.dropped += 1
            self._sync_now.set()

    def resync_soon(self) -> None:
        """Read every contact again now (the daemon calls this after an AMI reconnect)."""
        self._sync_now.set()

    def _wanted(self, binding: Binding) -> bool:
        return (binding.push.provider not in self.settings.disabled_providers
                and self.pusher.provider_for(binding) is not None)

    # ---------------------------------------------------------------- tasks

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._observer(stop), name="refresh-observer")
            tg.create_task(self._ticker(stop), name="refresh-ticker")
            tg.create_task(self._syncer(stop), name="refresh-syncer")

    async def _observer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(1.0):
                    binding, seen_at, fresh, expires = await self.queue.get()
            except TimeoutError:
                continue
            try:
                await self.observe_registration(binding, seen_at, fresh, expires)
            except (AriError, StoreUnavailable) as exc:
                log.debug("refresh: cannot schedule %s yet (%s); the next full read will", binding.aor, exc)
                self._sync_now.set()
            except Exception:
                log.exception("refresh: observing a registration of %s failed", binding.aor)

    async def observe_registration(self, binding: Binding, seen_at: float, fresh: bool,
                                   expires: float | None) -> None:
        """Schedule one registration; its expiration is read from the PBX unless given."""
        if expires is None:
            expires = await self.contacts.expiration(binding.aor, binding.contact_uri)
        if expires is not None:
            watch = Watch(binding.aor, binding.device_id, binding.contact_uri, expires, max(1.0, expires - seen_at))
            await self._observe(watch, exact=fresh)

    async def _observe(self, watch: Watch, exact: bool) -> Seen:
        seen, pushed_at = await self.schedule.observe(watch, exact)
        if seen is Seen.REREGISTERED:
            self._reregistered(watch.aor, pushed_at)
        return seen

    def _reregistered(self, aor: str, pushed_at: float) -> None:
        self.metrics.refresh_reregistered.inc()
        if pushed_at > 0:
            self.metrics.refresh_wake_latency.observe(max(0.0, self.clock() - pushed_at))
        log.debug("refresh: %s re-registered after its refresh push", aor)

    async def _syncer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                n = await self.sync()
                log.info("refresh: %d registered push contacts scheduled", n)
            except Exception as exc:  # AMI down, Redis down: try again on the next round
                log.warning("refresh: reading the registered contacts failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await stop.wait()
                continue
            self._sync_now.clear()
            waiter = asyncio.ensure_future(self._sync_now.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, timeout=self.settings.sync_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()

    async def sync(self) -> int:
        """Schedule every registered contact that carries push parameters; returns how many."""
        now = self.clock()
        n = 0
        for aor, uri, expires in await self.contacts.contacts():
            try:
                push = parse_contact(uri, self.policy)
            except ContactRejected:
                continue
            if push is None or expires <= now:
                continue
            probe = Binding(aor=aor, endpoint=aor, push=push, contact_uri=uri)
            if not self._wanted(probe):
                continue
            await self._observe(Watch(aor, push.device_id, uri, expires, max(1.0, expires - now)), exact=False)
            n += 1
        return n

    async def _ticker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except StoreUnavailable as exc:
                log.debug("refresh: schedule unavailable: %s", exc)
            except Exception:
                log.exception("refresh: tick failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.tick):
                    await stop.wait()

    async def tick(self) -> int:
        """Claim and work every due entry; returns how many were worked."""
        worked = 0
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(w: Watch) -> None:
            async with sem:
                try:
                    await self.work(w)
                except AriError as exc:  # Asterisk did not answer: look again soon
                    log.debug("refresh: %s deferred: %s", w.aor, exc)
                    with contextlib.suppress(StoreUnavailable):
                        await self.schedule.put(w, w.expires, due=self.clock() + RETRY_AFTER)
                except StoreUnavailable as exc:
                    # the claim lease brings it back; no push is lost, none doubled
                    log.debug("refresh: %s deferred: %s", w.aor, exc)
                except Exception:
                    log.exception("refresh: working %s failed", w.aor)

        while True:
            due = await self.schedule.claim(self.clock(), CLAIM_BATCH, self.settings.lease)
            if not due:
                return worked
            async with asyncio.TaskGroup() as tg:
                for w in due:
                    tg.create_task(one(w))
            worked += len(due)
            if len(due) < CLAIM_BATCH:
                return worked

    # ---------------------------------------------------------------- one entry

    async def work(self, w: Watch) -> None:
        now = self.clock()
        expires = await self.contacts.expiration(w.aor, w.contact_uri)
        refreshed = expires is not None and expires > w.expires + SAME_EXPIRY
        if refreshed:
            assert expires is not None
            if w.pushed_at > 0:
                self._reregistered(w.aor, w.pushed_at)
            # the same lifetime as before: phones re-register with the Expires they used
            await self.schedule.put(replace(w, expires=expires, pushed_at=0.0), w.expires)
            return
        if w.pushed_at or expires is None or expires <= now:
            # judged after the expiry (or the contact is gone already): it expired anyway
            self.metrics.refresh_expired.labels("yes" if w.pushed_at > 0 else "no").inc()
            await self.schedule.drop(w)
            return
        await self._push(w, now)

    async def _push(self, w: Watch, now: float) -> None:
        binding = next((b for b in await self.store.bindings_for(w.aor) if b.device_id == w.device_id), None)
        if binding is None or not self._wanted(binding):
            await self.schedule.drop(w)  # the device was forgotten, or its provider switched off
            return
        if not await self.schedule.allow_push(w.device_id, self.settings.min_interval, now):
            self.metrics.refresh_pushes.labels("rate-limited").inc()
            await self.schedule.put(replace(w, pushed_at=-1.0), w.expires)
            return
        message = PushMessage(
            kind=PushKind.REFRESH, call_id=f"refresh-{w.device_id}-{int(w.expires)}", caller_number="",
            caller_name="", callee=w.aor, deadline=w.expires,
            extra=(("expires", str(int(w.expires))), ("collapse_id", "refresh")))
        result = await self.pusher.send(replace(binding, contact_uri=w.contact_uri), message)
        self.metrics.refresh_pushes.labels(str(result.outcome)).inc()
        delivered = result.outcome is PushOutcome.DELIVERED
        if not delivered:
            log.info("refresh push to %s device %s (token %s): %s %s", w.aor, w.device_id,
                     mask(binding.push.token), result.outcome, result.reason)
        await self.schedule.put(replace(w, pushed_at=self.clock() if delivered else -1.0), w.expires)


def build_refresh(
    settings: RefreshSettings,
    schedule: RefreshSchedule,
    store: BindingStore,
    ari: AriGet,
    ami: AmiList,
    pusher: Pusher,
    policy: ContactPolicy,
    metrics: Metrics,
) -> RefreshScheduler | None:
    """The scheduler the composition root runs, or None when refresh pushes are off."""
    if not settings.enabled:
        return None
    return RefreshScheduler(settings, schedule, store, AsteriskContacts(ari, ami), pusher, policy, metrics)
