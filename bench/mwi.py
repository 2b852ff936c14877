"""Voicemail-push benchmark: real app_voicemail messages -> MessageWaiting -> ari-push -> FCM.
Not part of the tests.

    ARI_PUSH_RIG_SLOT=N .venv/bin/python bench/mwi.py [--messages 20] [--flood 20]

Latency: for each message (the caller talks 1 s, then hangs up; app_voicemail saves the
recording on the hang-up and raises MessageWaiting), the time from the MessageWaiting event (seen
by this harness on its own AMI connection) and from the caller's BYE to the push reaching the
local FCM; one fresh mailbox per message so the per-mailbox rate limit never delays it.
Flood: --flood messages left back to back in one mailbox with [mwi] min_interval = 3: how
many pushes went out and whether the last carried the final count. The daemon runs as a
subprocess. Results: docs/reachability.md.
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
from rig.demo import RecordingFcm, daemon_config, fcm_token, push_params  # noqa: E402
from rig.provision import asterisk_version, provision  # noqa: E402
from rig.redis import RedisServer, free_port  # noqa: E402
from rig.sipua import SipUA  # noqa: E402
from rig.voicemail import leave_message, voicemail_instance  # noqa: E402

FIRST = 7100
FLOOD_BOX = "7199"


async def ami_listen(port: int, seen: dict[tuple[str, str], float]) -> None:
    """(mailbox, new count) -> when MessageWaiting first said so (monotonic)."""
    from rig.asterisk import AMI_SECRET, AMI_USER

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"Action: Login\r\nUsername: {AMI_USER}\r\nSecret: {AMI_SECRET}\r\nEvents: call\r\n\r\n".encode())
    buf = b""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            now = time.monotonic()
            buf += data
            while b"\r\n\r\n" in buf:
                frame, _, buf = buf.partition(b"\r\n\r\n")
                if b"Event: MessageWaiting" in frame:
                    f = dict(line.split(": ", 1) for line in frame.decode().split("\r\n") if ": " in line)
                    seen.setdefault((f.get("Mailbox", ""), f.get("New", "")), now)
    finally:
        writer.close()


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"n": len(values), "median": round(statistics.median(values) * 1000, 1),
            "p90": round(pct(values, 90) * 1000, 1), "min": round(min(values) * 1000, 1),
            "max": round(max(values) * 1000, 1)}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(11)
    work = Path(tempfile.mkdtemp(prefix="ari-push-mwi-"))
    received: dict[str, list[tuple[float, dict[str, Any]]]] = {}

    def on_push(token: str, message: dict[str, Any], at: float) -> None:
        if message.get("data", {}).get("type") == "mwi":
            received.setdefault(token, []).append((at, message))

    fcm = RecordingFcm(on_push)
    (work / "sa.json").write_text(await fcm.start())
    boxes = [str(FIRST + i) for i in range(args.messages)] + [FLOOD_BOX]
    root = await asyncio.to_thread(provision)
    ast = await asyncio.to_thread(voicemail_instance, root, "bench-mwi", args.index,
                                  {b: f"{b}@default" for b in boxes}, boxes)
    redis = RedisServer(workdir=work / "redis")
    await asyncio.to_thread(redis.start)
    http_port = free_port()
    config = work / "ari-push.toml"
    config.write_text(daemon_config(ast, redis.url, http_port, work / "sa.json", fcm.url,
                                    f"bench-{uuid.uuid4().hex[:6]}:",
                                    extra='[log]\nlevel = "WARNING"\n[refresh]\nenabled = false\n'
                                          '[mwi]\nenabled = true\nmin_interval = 3\n'))
    daemon = Daemon(config, work / "daemon.log", http_port)
    slot = os.environ.pop("ARI_PUSH_RIG_SLOT", None)  # not a daemon setting
    try:
        await asyncio.to_thread(daemon.start)
    finally:
        if slot is not None:
            os.environ["ARI_PUSH_RIG_SLOT"] = slot
    seen: dict[tuple[str, str], float] = {}
    listener = asyncio.create_task(ami_listen(ast.ports.ami, seen))
    try:
        tokens = {}
        for box in boxes:
            tokens[box] = fcm_token(rng)
            phone = SipUA(box, ast.ports.sip)
            await phone.open()
            assert await phone.register(push_params(tokens[box])) == 200
            phone.close()  # asleep
        await asyncio.sleep(1.0)  # let the daemon store the bindings
        from_event, from_bye, bye_to_event = [], [], []
        for box in boxes[:-1]:
            bye = await leave_message(ast, box, 1.0)
            deadline = time.monotonic() + 15
            while not received.get(tokens[box]) and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            if received.get(tokens[box]):
                at = received[tokens[box]][0][0]
                from_bye.append(at - bye)
                event = seen.get((f"{box}@default", "1"))
                if event is not None:
                    from_event.append(at - event)
                    bye_to_event.append(event - bye)
        flood_started = time.monotonic()
        for _ in range(args.flood):
            await leave_message(ast, FLOOD_BOX, 0.1)
        flood_time = time.monotonic() - flood_started
        deadline = time.monotonic() + 30  # Asterisk saves short messages late: wait for the last count
        while time.monotonic() < deadline and [m["data"]["new"] for _, m in
                                               received.get(tokens[FLOOD_BOX], [])][-1:] != [str(args.flood)]:
            await asyncio.sleep(0.05)
        await asyncio.sleep(3.5)  # and one more interval: nothing else may follow
        flood = received.get(tokens[FLOOD_BOX], [])
        events = sum(1 for (box, _), _t in seen.items() if box == f"{FLOOD_BOX}@default")
        return {
            "asterisk": asterisk_version(root),
            "latency_event_to_push_ms": summary(from_event),
            "latency_bye_to_push_ms": summary(from_bye),
            "asterisk_bye_to_event_ms": summary(bye_to_event),
            "missing_pushes": args.messages - len(from_bye),
            "flood": {"messages": args.flood, "seconds": round(flood_time, 1), "distinct_counts_raised": events,
                      "pushes": len(flood),
                      "counts_pushed": [m["data"]["new"] for _, m in flood],
                      "last_count_is_final": bool(flood) and flood[-1][1]["data"]["new"] == str(args.flood)},
        }
    finally:
        listener.cancel()
        await asyncio.to_thread(daemon.stop)
        await fcm.stop()
        await asyncio.to_thread(ast.stop)
        await asyncio.to_thread(redis.cleanup)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20)
    p.add_argument("--flood", type=int, default=20)
    p.add_argument("--index", type=int, default=8, help="rig port block (plus 10 x ARI_PUSH_RIG_SLOT)")
    print(json.dumps(asyncio.run(main(p.parse_args())), indent=2))
