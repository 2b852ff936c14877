"""A real app_voicemail in a rig Asterisk: mailboxes, a dialplan that leaves messages, a caller.

The rig's modules.conf does not load app_voicemail (most tests do not need it); an instance
made with ``voicemail_instance`` writes voicemail.conf and loads the module after start-up.
Used by tests/integration/test_mwi.py and bench/mwi.py.
"""

from __future__ import annotations

from pathlib import Path

from rig.asterisk import AsteriskInstance, Ports
from rig.sipua import SipUA

CALLER = "vmcaller"
DIALPLAN = """\
[rig-vm]
; leave a message in mailbox <exten>@default: no greeting, recording starts at the beep
exten => _X.,1,Answer()
 same => n,VoiceMail(${EXTEN}@default,s)
 same => n,Hangup()
; visit mailbox <exten>@default without changing it (a MessageWaiting with the same counts)
exten => _vX.,1,Answer()
 same => n,VoiceMailMain(${EXTEN:1}@default,s)
 same => n,Hangup()
"""


def pjsip(boxes: dict[str, str]) -> str:
    """Push AORs; ``boxes`` maps AOR -> its endpoint's mailboxes= value ('' = none)."""
    out = [f"[{CALLER}](phone-endpoint)", f"aors={CALLER}", "context=rig-vm", f"[{CALLER}](push-aor)", ""]
    for aor, box in boxes.items():
        out += [f"[{aor}](phone-endpoint)", f"aors={aor}"] + ([f"mailboxes={box}"] if box else [])
        out += [f"[{aor}](push-aor)", "minimum_expiration=1", ""]
    return "\n".join(out)


def voicemail_instance(root: Path, name: str, index: int, boxes: dict[str, str],
                       users: list[str]) -> AsteriskInstance:
    inst = AsteriskInstance(root, name, Ports.for_index(index), extra_dialplan=DIALPLAN, extra_pjsip=pjsip(boxes))
    inst.write_config()
    lines = ["[general]", "format=wav", "minsecs=0", "maxsilence=0", "[default]"]
    lines += [f"{u} => 1234,Mailbox {u}" for u in users]
    (inst.host_path(inst.etc) / "voicemail.conf").write_text("\n".join(lines) + "\n")
    inst.start()
    inst.cli("module load app_voicemail.so")
    return inst


async def leave_message(inst: AsteriskInstance, box: str, seconds: float = 0.5) -> float:
    """Call the mailbox, talk for ``seconds``, hang up; returns time.monotonic() at the BYE."""
    import time

    caller = SipUA(CALLER, inst.ports.sip)
    await caller.open()
    try:
        resp = await caller.call(box, timeout=10)
        if resp.status != 200:
            raise RuntimeError(f"VoiceMail({box}) answered {resp.status}")
        assert caller.rtp is not None
        await caller.rtp.send_for(seconds)
        at = time.monotonic()
        await caller.hangup()
        return at
    finally:
        caller.close()


async def visit_mailbox(inst: AsteriskInstance, box: str) -> None:
    """VoiceMailMain for the mailbox, hung up after a second (no key pressed): nothing changes."""
    caller = SipUA(CALLER, inst.ports.sip)
    await caller.open()
    try:
        resp = await caller.call(f"v{box}", timeout=10)
        if resp.status == 200:
            assert caller.rtp is not None
            await caller.rtp.send_for(1.0)
            await caller.hangup()
    finally:
        caller.close()
