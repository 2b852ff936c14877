"""Channel helpers (channels.py: Stasis arguments, roles, call ids) and the push ledger."""

from __future__ import annotations

import os
import subprocess
import sys

from ari_push.channels import call_id_for, channel_role, stasis_args
from ari_push.push.ledger import MemoryLedger


def test_stasis_args_for_stasis_and_stasisbroadcast() -> None:
    assert stasis_args({"dialplan": {"app_name": "Stasis", "app_data": "ari-push-a,1001,timeout=25"}}) == \
        "1001,timeout=25"
    assert stasis_args({"dialplan": {"app_name": "StasisBroadcast", "app_data": "2000,^ari-push-,1001:timeout=9"}}) \
        == "1001,timeout=9"
    assert stasis_args({"dialplan": {"app_name": "StasisBroadcast", "app_data": "2000"}}) == ""
    assert stasis_args({}) == ""


def test_channel_roles() -> None:
    caller = {"state": "Ring", "dialplan": {"app_name": "Stasis", "app_data": "ari-push,1001"}}
    assert channel_role(caller, "1001") == "caller"
    assert channel_role({**caller, "state": "Up"}, "1001") == "up"
    leg = {"state": "Ringing", "dialplan": {"app_name": "AppDial2", "app_data": "(Outgoing Line)"}}
    assert channel_role(leg, "") == "leg"
    assert channel_role({**caller, "dialplan": {"app_name": "Stasis"}}, "dialed,1.2") == "leg"


async def test_memory_ledger_lets_one_push_per_call_device_kind() -> None:
    ledger = MemoryLedger()
    assert await ledger.first("c1", "d1", "call")
    assert not await ledger.first("c1", "d1", "call")
    assert await ledger.first("c1", "d1", "cancel") and await ledger.first("c1", "d2", "call")


def test_call_id_is_stable_per_asterisk_and_channel() -> None:
    # every daemon of a cluster computes the same id for a channel: another process agrees
    other = subprocess.run([sys.executable, "-c", "from ari_push.channels import call_id_for; "
                            "print(call_id_for('02:fc', '1.1'))"], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.stdout.strip() == call_id_for("02:fc", "1.1")
    assert call_id_for("02:fc", "1.1") != call_id_for("02:fd", "1.1")
