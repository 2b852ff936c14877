"""What the PBX's own qualify (SIP OPTIONS) says of each registered contact.

Asterisk qualifies a contact whose AOR has ``qualify_frequency > 0`` and reports each change
of its state in AMI ``ContactStatus`` (``Reachable``/``Unreachable``; ``NonQualified`` for a
new contact, or for every contact of an AOR that is not qualified; ``Removed``), and the
current state in ``PJSIPShowContacts`` (``Status``). A periodic qualify with an unchanged
state says nothing, so the last state seen stands until the next change.

The call flow reads it to decide whether a pushed device's old UDP contact is worth an
INVITE (docs/architecture.md, "Awake phones"): a contact that answers OPTIONS is awake and is
rung at once; one that does not is asleep, and an INVITE to it would be retransmitted for
32 s for nothing; with no qualify the flow cannot tell and rings it after a delay.

Kept in process, per daemon (every daemon of a cluster reads the same AMI events), bounded.
"""

from __future__ import annotations

from enum import StrEnum

from ari_push.recent import RecentMap


class Reach(StrEnum):
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"
    UNKNOWN = "unknown"  # not qualified (qualify_frequency = 0), not qualified yet, or never seen


_STATES = {"reachable": Reach.REACHABLE, "unreachable": Reach.UNREACHABLE}


class ContactReach:
    """The last qualify state of each contact URI. ``limit`` bounds memory (oldest forgotten)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._state: RecentMap[str, Reach] = RecentMap(limit)

    def on_status(self, uri: str, status: str) -> None:
        """A ContactStatus / ContactList status for ``uri`` (any case; unknown values forget it)."""
        if not uri:
            return
        state = _STATES.get(status.strip().lower())
        if state is None:  # NonQualified, Unknown, Removed, Created, Updated...
            self._state.pop(uri)
        else:
            self._state.put(uri, state)

    def of(self, uri: str) -> Reach:
        return self._state.get(uri) or Reach.UNKNOWN

    def __len__(self) -> int:
        return len(self._state)
