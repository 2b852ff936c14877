"""Strict local stand-ins for the push services (FCM, APNs, vendor URLs / webhooks).

Each fake has ``await start(host="127.0.0.1", port=0)`` / ``await stop()`` so the unit
tests, the end-to-end tests and the demo can all run them; credentials come from
:mod:`tests.fakes.keys`, generated at run time.
"""

from tests.fakes.apns import ApnsAnswer, ApnsRequest, FakeApns
from tests.fakes.fcm import FakeFcm, FcmAnswer, FcmRequest, TokenAnswer
from tests.fakes.keys import Pki, make_pki, service_account
from tests.fakes.vendor import FakeVendor, VendorAnswer, VendorRequest

__all__ = [
    "ApnsAnswer", "ApnsRequest", "FakeApns", "FakeFcm", "FakeVendor", "FcmAnswer", "FcmRequest", "Pki", "TokenAnswer",
    "VendorAnswer", "VendorRequest", "make_pki", "service_account",
]
