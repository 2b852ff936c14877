"""Prometheus metrics, one registry per daemon (tests run several in one process).

Documented in docs/operations.md.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.registrations = Counter(
            "ari_push_registrations_captured", "Contacts with push parameters stored, by dialect",
            ["dialect"], registry=r)
        self.rejected = Counter(
            "ari_push_contacts_rejected", "Contacts refused by the parser, by reason", ["reason"], registry=r)
        self.pushes = Counter(
            "ari_push_pushes", "Pushes sent, by provider, kind and result", ["provider", "kind", "result"],
            registry=r)
        self.calls = Counter("ari_push_calls", "Calls handled, by PUSH_STATUS", ["status"], registry=r)
        self.calls_waiting = Gauge("ari_push_calls_waiting", "Calls waiting for a device to wake", registry=r)
        self.wake_latency = Histogram(
            "ari_push_wake_latency_seconds", "Push sent to re-registration seen",
            buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30), registry=r)
        self.link_up = Gauge("ari_push_link_up", "1 when the link is connected", ["link"], registry=r)
        self.devices_evicted = Counter(
            "ari_push_devices_evicted", "Devices dropped because their AOR had more than "
            "[capture] max_devices_per_aor (the least recently seen goes)", registry=r)
        self.store_errors = Counter(
            "ari_push_store_errors", "Binding store operations that failed (Redis down)", registry=r)
        # ---- reachability (docs/reachability.md)
        self.refresh_pushes = Counter(
            "ari_push_refresh_pushes", "Registration-refresh pushes, by result (delivered, rate-limited, ...)",
            ["result"], registry=r)
        self.refresh_reregistered = Counter(
            "ari_push_refresh_reregistered", "Devices seen re-registering after a refresh push, before expiry",
            registry=r)
        self.refresh_expired = Counter(
            "ari_push_refresh_expired", "Push contacts that expired anyway, by whether a refresh push was sent",
            ["pushed"], registry=r)
        self.refresh_wake_latency = Histogram(
            "ari_push_refresh_wake_seconds", "Refresh push sent to the re-registration being seen",
            buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320), registry=r)
        self.mwi_pushes = Counter(
            "ari_push_mwi_pushes", "Voicemail pushes, by result", ["result"], registry=r)
        self.mwi_events = Counter(
            "ari_push_mwi_events", "MessageWaiting events, by what became of them (pushed, unchanged, "
            "coalesced, unmapped)", ["fate"], registry=r)
        self.messages = Counter(
            "ari_push_messages", "SIP MESSAGEs handed over by the dialplan, by fate (stored, delivered, expired, "
            "not-push, full)", ["fate"], registry=r)
        self.message_pushes = Counter(
            "ari_push_message_pushes", "Pushes for waiting SIP MESSAGEs, by result", ["result"], registry=r)
        # ---- call traces (docs/operations.md, "Call traces")
        self.trace_writes_dropped = Counter(
            "ari_push_trace_writes_dropped", "Call trace writes lost, by reason (redis: the store refused them; "
            "overflow: the write buffer was full; stopped: still held at stop); the calls themselves are not "
            "affected", ["reason"], registry=r)
