"""End-to-end on FreeSWITCH: real FreeSWITCH 1.10.12 + Redis + the FreeSWITCH side of the daemon
(ari_push.service.Daemon on its FreeSWITCH side, in this process) + a local vendor push endpoint, with our SIP phone
(digest auth) that wakes a set delay after the push. Not part of the tests.

    ARI_PUSH_RIG_SLOT=N .venv/bin/python bench/freeswitch_e2e.py [--rounds 20] [--answer-rounds 5]

Sections (docs/freeswitch.md has the results):
  latency  re-REGISTER sent by the woken phone -> INVITE received by it, new-URI and same-URI wakes
  answer   time to answer (caller INVITE -> 200 OK) for wake delays 0.3/1/2.5/4 s: ari-push vs the
           FreeSWITCH recipe (push at call start, `sleep 2000`, then `bridge ${sofia_contact(...)}`)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ari_push.service import Daemon
from ari_push.settings import load
from rig.freeswitch import ESL_PASSWORD, PROFILE, SIP_PASSWORD, FreeswitchInstance, FsPorts, recipe_dialplan
from rig.redis import RedisServer
from rig.sipua import SipUA

RECIPE = recipe_dialplan()  # `sleep 2000` then bridge; the harness wakes the phone at the call's start
DELAYS = (0.3, 1.0, 2.5, 4.0)


class Pushes:
    def __init__(self) -> None:
        self.calls: asyncio.Queue[float] = asyncio.Queue()
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        if body.get("type") == "call":
            self.calls.put_nowait(time.monotonic())
        return web.json_response({"ok": True})


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]  # nearest rank
    return {"median_ms": round(statistics.median(values), 1), "p99_ms": round(p99, 1),
            "max_ms": round(max(values), 1), "n": len(values)}


async def wake(phone: SipUA, when: asyncio.Future[float] | float, delay: float, same_uri: bool,
               port: int) -> float:
    """Asleep until ``delay`` after the push; then a socket again (the same port or a new one)."""
    started = await when if isinstance(when, asyncio.Future) else when
    await asyncio.sleep(max(0.0, started + delay - time.monotonic()))
    await phone.open(port if same_uri else 0)
    sent = time.monotonic()
    assert await phone.register() == 200
    return sent


async def one(fs: FreeswitchInstance, phone: SipUA, caller: SipUA, pushes: Pushes, target: str, delay: float,
              same_uri: bool, recipe: bool) -> tuple[float | None, float | None]:
    """(time to answer, REGISTER -> INVITE) in ms; None when the call was not answered.

    Each call starts from one registration: the user's registrations are flushed and the phone
    registers once more before it sleeps, so stale contacts of earlier wakes (FreeSWITCH keeps
    them until they expire) do not pile up forks across rounds (docs/freeswitch.md)."""
    await asyncio.to_thread(fs.api, f"sofia profile {PROFILE} flush_inbound_reg {phone.user}@127.0.0.1")
    assert await phone.register() == 200
    port = phone.port
    phone.close()
    while not phone.invites.empty():
        phone.invites.get_nowait()
    t0 = time.monotonic()
    call = caller.start_call(("recipe-" if recipe else "") + target, timeout=30)
    if recipe:
        registered = await wake(phone, t0, delay, same_uri, port)  # the recipe pushes at call start
    else:
        push_at: asyncio.Future[float] = asyncio.ensure_future(pushes.calls.get())
        registered = await wake(phone, push_at, delay, same_uri, port)
    try:
        async with asyncio.timeout(15):
            invite = await phone.invites.get()
        answer = await call
    except TimeoutError:
        call.cancel()
        with contextlib.suppress(BaseException):
            await call
        return None, None
    answered = time.monotonic()
    if answer.status != 200:
        return None, None
    # FreeSWITCH answers the caller just before uuid_bridge (it refuses to bridge a ringing
    # caller): a hang-up within those few ms would beat the bridge. Talk for a moment.
    await asyncio.sleep(0.3)
    with contextlib.suppress(Exception):
        await caller.hangup()
    await asyncio.sleep(0.2)
    return (answered - t0) * 1000, (invite.received - registered) * 1000


async def main(rounds: int, answer_rounds: int) -> dict[str, object]:
    fs = FreeswitchInstance.provisioned("bench", FsPorts.for_index(6), extra_dialplan=RECIPE)
    fs.write_config()
    fs.start()
    redis = RedisServer()
    redis.start()
    pushes = Pushes()
    app = web.Application()
    app.router.add_post("/push/{device}", pushes.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    pushes.port = runner.addresses[0][1]
    out: dict[str, object] = {}
    stop = asyncio.Event()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fs.toml"
        path.write_text(
            f'[freeswitch]\nport = {fs.ports.esl}\npassword = "{ESL_PASSWORD}"\nprofile = "{PROFILE}"\n'
            f'[redis]\nurl = "{redis.url}"\nkey_prefix = "bench-{uuid.uuid4().hex[:6]}:"\n'
            '[capture]\nvendor_allowed_hosts = ["127.0.0.1:*"]\n[calls]\ndefault_timeout = 20\n'
            '[push]\nrate_per_minute = 0\n[http]\nenabled = false\n')
        daemon = Daemon(load(path, environ={}))
        assert daemon.esl is not None
        task = asyncio.create_task(daemon.run(stop))
        try:
            await daemon.esl.link.wait_up(15)
            caller = SipUA("3101", fs.ports.sip, password=SIP_PASSWORD)
            await caller.open()
            for same_uri in (False, True):
                phone = SipUA("3100", fs.ports.sip, password=SIP_PASSWORD)
                await phone.open()
                assert await phone.register(f"X-PUSH-URI=http://127.0.0.1:{pushes.port}/push/3100") == 200
                await asyncio.sleep(0.3)
                lat = []
                for _ in range(rounds):
                    _, r2i = await one(fs, phone, caller, pushes, "3100", 0.05, same_uri, recipe=False)
                    if r2i is not None:
                        lat.append(r2i)
                out[f"register_to_invite_{'same' if same_uri else 'new'}_uri"] = stats(lat)
                table = {}
                for delay in DELAYS:
                    row = {}
                    for recipe in (False, True):
                        answered = []
                        for _ in range(answer_rounds):
                            tta, _ = await one(fs, phone, caller, pushes, "3100", delay, same_uri, recipe)
                            if tta is not None:
                                answered.append(tta)
                        row["recipe" if recipe else "ari-push"] = {
                            "answered": f"{len(answered)}/{answer_rounds}",
                            "median_ms": round(statistics.median(answered), 0) if answered else None}
                    table[str(delay)] = row
                out[f"time_to_answer_{'same' if same_uri else 'new'}_uri"] = table
                with contextlib.suppress(Exception):
                    await phone.unregister()
                phone.close()
            caller.close()
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(20):
                    await task
            await runner.cleanup()
            fs.stop()
            redis.cleanup()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--answer-rounds", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.rounds, args.answer_rounds)), indent=2))
