"""A test phone on a real SIP stack: PJSIP 2.15 through ``pjsua2`` (PyPI ``pjsua2-python``).

It runs as its own process (``python -m rig.pjsua_phone``), driven over stdin/stdout JSON lines,
so that a test can SIGKILL it (an app killed by the OS: no un-REGISTER, its contact stays in
Asterisk) and start a new process, which binds a new port and re-registers, as a phone woken by a
push does. The parent side is :class:`PjsuaPhone` (asyncio); both share :mod:`rig.phone_proc`.

The child: one pjsua2 ``Endpoint`` on the null audio device, one transport (UDP or TCP) on a port
the kernel picks, one account whose ``sipConfig.contactUriParams`` carries the push parameters
(``;pn-provider=fcm;pn-prid=...;pn-param=...``), registering at 127.0.0.1:<Asterisk SIP port>.
It answers every INVITE (180, then 200) unless told otherwise, and reports what happens as events:

    {"event": "ready", "port": 40312, "transport": "udp", "pid": 123}
    {"event": "registered", "code": 200, "expires": 300, "sent": 1234.5}   sent: when its REGISTER left
    {"event": "incoming", "uri": "sip:3001@...", "call_id": "...", "x_ari_push_call_id": "..."}
    {"event": "confirmed"}                    the call is up (ACK received)
    {"event": "disconnected", "code": 200, "reason": "Normal call clearing"}

Commands (one JSON object a line): ``{"cmd": "hangup"}``, ``{"cmd": "quit"}`` (un-REGISTER and
exit: the polite way; a test that wants a killed app uses SIGKILL instead).
pjsua2 runs single-threaded here (no worker threads, events polled in the main loop), so its
callbacks never race Python code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import sys
import time
from pathlib import Path
from typing import Any

from rig.phone_proc import PhoneProcess

REPO = Path(__file__).resolve().parent.parent


class PjsuaPhone(PhoneProcess):
    """The parent side: start, command and kill one pjsua2 child process."""

    kind = "pjsua2"

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "rig.pjsua_phone", "--user", self.user, "--server-port",
                str(self.server_port), "--transport", self.transport, "--params", self.params]
        if self.answer_code != 200:
            argv += ["--answer-code", str(self.answer_code)]
        return argv

    def cwd(self) -> Path:
        return REPO


# ---------------------------------------------------------------- the child process


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


def _header(whole: str, name: str) -> str:
    m = re.search(rf"(?im)^{re.escape(name)}\s*:\s*(.*?)\s*$", whole.split("\r\n\r\n", 1)[0])
    return m.group(1) if m else ""


def child_main(argv: list[str]) -> int:
    import pjsua2 as pj  # type: ignore[import-untyped]

    ap = argparse.ArgumentParser(prog="python -m rig.pjsua_phone")
    ap.add_argument("--user", required=True)
    ap.add_argument("--server-port", type=int, required=True)
    ap.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    ap.add_argument("--params", default="", help="Contact URI parameters, e.g. pn-provider=fcm;pn-prid=...")
    ap.add_argument("--answer-code", type=int, default=200)
    ap.add_argument("--expires", type=int, default=300)
    ap.add_argument("--log-level", type=int, default=0)
    args = ap.parse_args(argv)

    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0  # no worker thread: events are polled below
    cfg.uaConfig.mainThreadOnly = True
    cfg.uaConfig.userAgent = f"ari-push-rig pjsua2/{ep.libVersion().full}"
    cfg.logConfig.level = args.log_level
    cfg.logConfig.consoleLevel = args.log_level
    cfg.medConfig.hasIoqueue = True
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()
    tcfg = pj.TransportConfig()
    tcfg.port = 0  # a new process binds a new port, as a woken app does
    tcfg.boundAddress = "127.0.0.1"
    kind = pj.PJSIP_TRANSPORT_UDP if args.transport == "udp" else pj.PJSIP_TRANSPORT_TCP
    tid = ep.transportCreate(kind, tcfg)
    ep.libStart()
    port = ep.transportGetInfo(tid).localName.rsplit(":", 1)[1]

    calls: list[Any] = []
    state = {"running": True}

    class Call(pj.Call):  # type: ignore[misc]
        def onCallState(self, prm: Any) -> None:
            ci = self.getInfo()
            if ci.state == pj.PJSIP_INV_STATE_CONFIRMED:
                _emit("confirmed", call_id=ci.callIdString)
            elif ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                _emit("disconnected", call_id=ci.callIdString, code=int(ci.lastStatusCode),
                      reason=str(ci.lastReason))

        def onCallMediaState(self, prm: Any) -> None:
            ci = self.getInfo()
            for i, media in enumerate(ci.media):
                if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                    aud = self.getAudioMedia(i)
                    mgr = ep.audDevManager()
                    aud.startTransmit(mgr.getPlaybackDevMedia())
                    mgr.getCaptureDevMedia().startTransmit(aud)

    class Account(pj.Account):  # type: ignore[misc]
        sent = 0.0

        def onRegStarted(self, prm: Any) -> None:
            self.sent = time.monotonic()  # the REGISTER is about to go out

        def onRegState(self, prm: Any) -> None:
            info = self.getInfo()
            _emit("registered" if prm.code // 100 == 2 and info.regIsActive else "registration",
                  code=int(prm.code), expires=int(info.regExpiresSec), active=bool(info.regIsActive),
                  sent=self.sent)

        def onIncomingCall(self, prm: Any) -> None:
            call = Call(self, prm.callId)
            calls.append(call)
            whole = str(prm.rdata.wholeMsg)
            ci = call.getInfo()
            _emit("incoming", uri=whole.split(" ", 2)[1], call_id=ci.callIdString,
                  x_ari_push_call_id=_header(whole, "X-Ari-Push-Call-Id"), source=str(prm.rdata.srcAddress))
            op = pj.CallOpParam()
            op.statusCode = 180
            call.answer(op)
            op = pj.CallOpParam()
            op.statusCode = args.answer_code
            call.answer(op)

    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:{args.user}@127.0.0.1"
    suffix = ";transport=tcp" if args.transport == "tcp" else ""
    acfg.regConfig.registrarUri = f"sip:127.0.0.1:{args.server_port}{suffix}"
    acfg.regConfig.timeoutSec = args.expires
    acfg.regConfig.retryIntervalSec = 2
    if args.params:
        acfg.sipConfig.contactUriParams = ";" + args.params.lstrip(";")
    acfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
    acc = Account()
    acc.create(acfg)
    _emit("ready", port=int(port), transport=args.transport, pid=os.getpid())

    def handle(line: str) -> None:
        try:
            cmd = json.loads(line)
        except ValueError:
            _emit("error", message=f"not JSON: {line[:80]!r}")
            return
        name = cmd.get("cmd") if isinstance(cmd, dict) else None
        if name == "hangup":
            for call in calls:
                if call.isActive():
                    call.hangup(pj.CallOpParam())
        elif name == "quit":
            state["running"] = False
        else:
            _emit("error", message=f"unknown command {name!r}")

    buf = ""
    while state["running"]:
        ep.libHandleEvents(10)
        ready, _, _ = select.select([sys.stdin], [], [], 0)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 65536).decode(errors="replace")
            if not chunk:
                break  # the test closed our stdin: leave as on "quit"
            buf += chunk
            while "\n" in buf:
                line, buf = buf.split("\n", 1)
                if line.strip():
                    handle(line)
        calls[:] = [c for c in calls if c.isActive()]
    # polite exit: un-REGISTER, give pjsua a moment to send it
    ep.hangupAllCalls()
    acc.setRegistration(False)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        ep.libHandleEvents(10)
    acc.shutdown()
    ep.libDestroy()
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
