"""systemd readiness (``Type=notify``): a datagram to ``$NOTIFY_SOCKET``, standard library only.

``READY=1`` is sent once, when the daemon can first take a call (the links /readyz checks are
up); ``STOPPING=1`` when it starts to drain. Without ``$NOTIFY_SOCKET`` (not under systemd, or
``Type=simple``) every call does nothing. An abstract socket name starts with ``@``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("ari_push.sd_notify")


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=taking calls"``); True when it was sent."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address[0] not in ("/", "@"):
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract name; readiness not sent", address[:60])
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.warning("could not notify the service manager (%s): %s", address[:60], exc)
        return False
    return True
