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
