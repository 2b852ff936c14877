"""Capture of a contact accepted in part: the bad half of a dual token is counted, the binding kept."""

from __future__ import annotations

from ari_push.bindings import MemoryStore
from ari_push.capture import Capture
from ari_push.contacts import ContactPolicy
from ari_push.metrics import Metrics
from ari_push.wakeups import WakeupHub


async def test_the_good_half_is_stored_and_the_bad_half_counted() -> None:
    store, metrics = MemoryStore(), Metrics()
    capture = Capture(store, WakeupHub(), ContactPolicy(), None, metrics)
    uri = ("sip:1001@10.0.0.6:5060;pn-provider=apns;pn-prid=" + "ab" * 32 + ":voip&nothex:remote;"
           "pn-param=ABCDE12345.com.example.phone.voip&remote")
    binding = await capture.capture("1001", "1001", uri, "phone/1.0")
    assert binding is not None and binding.push.token == "ab" * 32
    assert [b.device_id for b in await store.bindings_for("1001")] == [binding.device_id]
    assert metrics.rejected.labels("token-alphabet")._value.get() == 1
