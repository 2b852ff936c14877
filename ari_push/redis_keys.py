"""Every Redis key ari-push uses, in one place (layout documented in docs/storage.md).

All keys start with the configured prefix (default ``ari-push:``). The AOR is part of the
key; with Redis Cluster, keys of one AOR share a hash tag ``{aor}`` so scripts touching
them stay in one slot.
"""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def bindings(self, aor: str) -> str:
        """HASH device_id -> binding JSON: the push devices of one AOR."""
        return f"{self.prefix}bindings:{{{aor}}}"

    def seen(self) -> str:
        """ZSET "aor\\x00device_id" scored by last_seen: the retention sweep and `tokens list`."""
        return f"{self.prefix}seen"

    def registered_channel(self, aor: str) -> str:
        """Pub/sub channel: a contact of this AOR (re)registered. Payload: JSON Registration."""
        return f"{self.prefix}registered:{aor}"

    def registered_pattern(self) -> str:
        return f"{self.prefix}registered:*"

    def nodes(self) -> str:
        """ZSET app name -> last heartbeat (Redis server time, ms): which daemons are alive."""
        return f"{self.prefix}nodes"

    def adopt(self, channel_id: str) -> str:
        """STRING node id, NX with a TTL: one daemon adopts a dead daemon's channel."""
        return f"{self.prefix}adopt:{channel_id}"

    def claim(self, channel_id: str) -> str:
        """STRING member name, NX with a TTL: the daemon that handles a parked FreeSWITCH call."""
        return f"{self.prefix}claim:{channel_id}"

    def lease(self, app: str) -> str:
        """STRING node id, NX + PX: who may connect the shared Stasis app (lease mode)."""
        return f"{self.prefix}lease:{app}"

    def ratelimit(self, device_id: str) -> str:
        """HASH t (last update, server time) / v (tokens): one device's push token bucket."""
        return f"{self.prefix}ratelimit:{device_id}"

    def pushed(self, call_id: str, device_id: str, kind: str) -> str:
        """STRING, NX with a TTL: this (call, device, kind) push was sent once already."""
        return f"{self.prefix}pushed:{call_id}:{device_id}:{kind}"

    # ---- reachability: one hash tag, so each Lua script stays in one Cluster slot

    def refresh_state(self) -> str:
        """HASH "aor\x00device_id" -> Watch JSON: registered push contacts (refresh_store.py)."""
        return f"{self.prefix}{{refresh}}:state"

    def refresh_due(self) -> str:
        """ZSET "aor\x00device_id" scored by the Unix time it is next due (or its claim lease)."""
        return f"{self.prefix}{{refresh}}:due"

    def refresh_sent(self, device_id: str) -> str:
        """STRING, NX + PX: a refresh push went to this device within the minimum interval."""
        return f"{self.prefix}refresh-sent:{device_id}"

    def mwi_state(self) -> str:
        """HASH mailbox -> "new:old:sent_at": the counts last pushed for each mailbox (mwi.py)."""
        return f"{self.prefix}mwi"

    def messages(self, aor: str) -> str:
        """HASH message id -> JSON: SIP MESSAGEs waiting for a device of this AOR (messages.py)."""
        return f"{self.prefix}messages:{{{aor}}}"

    def messages_expiry(self) -> str:
        """ZSET "aor\x00id" scored by when the message expires."""
        return f"{self.prefix}messages-expiry"

