"""SIP MESSAGE delivery benchmark: a MESSAGE for a sleeping phone, the push, the phone's
re-REGISTER, and the time from its 200 OK to the MESSAGE reaching it. Not part of the tests.

    ARI_PUSH_RIG_SLOT=N .venv/bin/python bench/messages.py [--messages 30] [--poll 1.0]

Real Asterisk 22 (the sample message context, CURL to the daemon), Redis, the daemon as a
subprocess, the strict local FCM. Half the phones wake with a new socket (a new contact, seen
from AMI at once), half re-register the same contact after 1.5 s (no event: found by polling
every --poll s). Results: docs/reachability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.e2e import Daemon  # noqa: E402
from rig.asterisk import TEST_AOR_FIRST, AsteriskInstance, Ports  # noqa: E402
from rig.demo import RecordingFcm, daemon_config, fcm_token, push_params  # noqa: E402
from rig.provision import provision  # noqa: E402
from rig.redis import RedisServer, free_port  # noqa: E402
from rig.sipua import SipUA  # noqa: E402


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    return {"n": len(s), "median": round(statistics.median(s) * 1000, 1),
            "p90": round(s[min(len(s) - 1, round(0.9 * (len(s) - 1)))] * 1000, 1),
            "min": round(s[0] * 1000, 1), "max": round(s[-1] * 1000, 1)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(11)
    work = Path(tempfile.mkdtemp(prefix="ari-push-msg-"))
    pushed: dict[str, float] = {}

    def on_push(token: str, message: dict[str, Any], at: float) -> None:
        if message.get("data", {}).get("type") == "message":
            pushed.setdefault(token, at)

    fcm = RecordingFcm(on_push)
    (work / "sa.json").write_text(await fcm.start())
    root = await asyncio.to_thread(provision)
    ast = AsteriskInstance(root, "bench-msg", Ports.for_index(args.index))
    await asyncio.to_thread(ast.write_config)
    await asyncio.to_thread(ast.start)
    redis = RedisServer(workdir=work / "redis")
    await asyncio.to_thread(redis.start)
    http_port = free_port()
    config = work / "ari-push.toml"
    config.write_text(daemon_config(ast, redis.url, http_port, work / "sa.json", fcm.url,
                                    f"bench-{uuid.uuid4().hex[:6]}:",
                                    extra=f'[log]\nlevel = "WARNING"\n[refresh]\nenabled = false\n'
                                          f'[messages]\npoll = {args.poll}\n'))
    daemon = Daemon(config, work / "daemon.log", http_port)
    slot = os.environ.pop("ARI_PUSH_RIG_SLOT", None)  # not a daemon setting
    try:
        await asyncio.to_thread(daemon.start)
    finally:
        if slot is not None:
            os.environ["ARI_PUSH_RIG_SLOT"] = slot
    ast.cli(f"dialplan set global ARI_PUSH_URL http://127.0.0.1:{http_port}")
    sender = SipUA(str(TEST_AOR_FIRST + 199), ast.ports.sip)
    await sender.open()
    results: dict[str, list[float]] = {"new-contact": [], "same-contact": []}
    push_latency: list[float] = []
    lost = 0
    try:
        for i in range(args.messages):
            aor = str(TEST_AOR_FIRST + i)
            token = fcm_token(rng)
            phone = SipUA(aor, ast.ports.sip)
            await phone.open()
            assert await phone.register(push_params(token)) == 200
            port = phone.port
            await asyncio.sleep(0.3)  # the daemon stores the binding
            phone.close()
            sent = time.monotonic()
            assert await sender.send_message(aor, f"bench message {i}") == 202
            while token not in pushed and time.monotonic() - sent < 10:
                await asyncio.sleep(0.002)
            if token not in pushed:
                lost += 1
                continue
            push_latency.append(pushed[token] - sent)
            same = i % 2 == 1
            if same:
                await asyncio.sleep(1.5)
            await phone.open(port if same else 0)
            assert await phone.register(push_params(token)) == 200
            registered = time.monotonic()
            try:
                async with asyncio.timeout(10):
                    msg = await phone.messages.get()
                results["same-contact" if same else "new-contact"].append(msg.received - registered)
            except TimeoutError:
                lost += 1
            await phone.unregister()
            phone.close()
        return {"poll_s": args.poll, "messages": args.messages, "lost": lost,
                "message_to_push_at_fcm_ms": summary(push_latency),
                "re_register_to_message_ms": {k: summary(v) for k, v in results.items()}}
    finally:
        sender.close()
        await asyncio.to_thread(daemon.stop)
        await fcm.stop()
        await asyncio.to_thread(ast.stop)
        await asyncio.to_thread(redis.cleanup)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=30)
    p.add_argument("--poll", type=float, default=1.0, help="[messages] poll of the daemon")
    p.add_argument("--index", type=int, default=8, help="rig port block (plus 10 x ARI_PUSH_RIG_SLOT)")
    print(json.dumps(asyncio.run(main(p.parse_args())), indent=2))
