"""The one interface every push provider implements."""

from __future__ import annotations

from typing import Protocol

from ari_push.model import Binding, PushMessage, PushResult


class PushProvider(Protocol):
    """Sends one push to one device. Owns one long-lived client; never raises for a
    provider's answer or a network error: every outcome is a PushResult."""

    name: str

    def serves(self, binding: Binding) -> bool:
        """True when this provider has credentials for the binding's provider and topic/project."""
        ...

    async def warm(self) -> None:
        """Make the HTTP client(s) (TLS set-up costs 40-80 ms) and fetch credentials now, not on
        the first call's push. Called once by the daemon at start; never raises."""
        ...

    async def send(self, binding: Binding, message: PushMessage) -> PushResult: ...

    async def aclose(self) -> None: ...
