"""`make demo` stops everything it started when interrupted (Ctrl-C) in the middle of a call, and
shows the outcome docs/demo.md promises, on Asterisk and on FreeSWITCH (`make demo PBX=freeswitch`).

The demo runs as a subprocess on its own Asterisk instance (index 6, name "demotest"), as a user
would run it; SIGINT is sent to it as a terminal's Ctrl-C would be. Afterwards no Asterisk,
Redis or daemon process of that run may remain, and the instance's ports must be free.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rig.asterisk import Ports

REPO = Path(__file__).resolve().parents[2]
NAME, INDEX = "demotest", 6


def _cmdlines() -> dict[int, str]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _port_free(port: int, kind: int) -> bool:
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        s.close()
    return True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("interrupt_at", ["ari-push pushes the phone", "the recipe pushes the phone"],
                         ids=["during-call-1", "during-call-2"])
def test_ctrl_c_midway_stops_every_process(asterisk_root: Path, interrupt_at: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rig", "demo", "--index", str(INDEX), "--name", NAME, "--wake", "3"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 40
        for line in proc.stdout:
            seen.append(line)
            if interrupt_at in line:
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            pytest.fail("the demo ended before the interruption point:\n" + "".join(seen))
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output
    assert "interrupted: stopping everything" in output
    assert "stopped: Asterisk, Redis and the daemon are gone" in output
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", output)]
    assert len(pids) == 3, output  # Asterisk, Redis, daemon
    workdir = re.search(r"log (/tmp/ari-push-demo-\S+)/daemon\.log", output)
    assert workdir is not None, output
    time.sleep(0.2)
    assert [p for p in pids if _alive(p)] == [], output
    leftovers = {pid: cmd for pid, cmd in _cmdlines().items()
                 if f"asterisk-{NAME}/" in cmd or workdir.group(1) in cmd}
    assert leftovers == {}, leftovers
    assert not Path(workdir.group(1)).exists()
    ports = Ports.for_index(INDEX)
    assert _port_free(ports.sip, socket.SOCK_DGRAM)
    assert _port_free(ports.http, socket.SOCK_STREAM)
    assert _port_free(ports.ami, socket.SOCK_STREAM)


@pytest.mark.timeout(180)
def test_demo_outcome_ari_push_answers_where_the_recipe_fails(asterisk_root: Path) -> None:
    """The outcome docs/demo.md promises for `make demo WAKE=4`: the phone wakes 4 s after its
    push; through ari-push the call is answered, through the Wait(3) recipe it is not."""
    proc = subprocess.run(
        [sys.executable, "-m", "rig", "demo", "--index", str(INDEX), "--name", NAME, "--wake", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    results = [line.strip() for line in out.splitlines() if line.strip().startswith("result:")]
    assert len(results) == 2, out
    assert results[0].startswith("result: ANSWERED"), out  # call 1: ari-push
    assert results[1].startswith("result: FAILED"), out  # call 2: the recipe gave up before the wake
    assert "stopped: Asterisk, Redis and the daemon are gone" in out


@pytest.mark.timeout(180)
def test_freeswitch_demo_outcome_ari_push_answers_where_the_sleep_recipe_fails(asterisk_root: Path) -> None:
    """`make demo PBX=freeswitch WAKE=4`: the same timeline on FreeSWITCH; the phone wakes 4 s after
    its push: through ari-push the call is answered, through the `sleep 2000` then bridge recipe it
    is not (it bridges to the sleeping contact). Every process it started is gone afterwards."""
    proc = subprocess.run(
        [sys.executable, "-m", "rig", "demo", "--pbx", "freeswitch", "--index", str(INDEX), "--name", NAME,
         "--wake", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "park for ari-push (push_target=1001)" in out and "sleep 2000" in out
    results = [line.strip() for line in out.splitlines() if line.strip().startswith("result:")]
    assert len(results) == 2, out
    assert results[0].startswith("result: ANSWERED, PUSH_STATUS ANSWERED"), out  # call 1: ari-push
    assert results[1].startswith("result: FAILED"), out  # call 2: the recipe bridged before the wake
    assert "INVITE reaches the phone" in out and "audio both ways through FreeSWITCH" in out
    assert "stopped: FreeSWITCH, Redis and the daemon are gone" in out
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]
    assert len(pids) == 3, out  # FreeSWITCH, Redis, daemon
    assert [p for p in pids if _alive(p)] == [], out
