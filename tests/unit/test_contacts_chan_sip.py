"""parse_chan_sip_registry on astdb ``SIP/Registry/<peer>`` values (Asterisk <= 20, chan_sip).

No chan_sip Asterisk runs here, so the values are written in the exact format chan_sip's
parse_register_contact() stores: ``snprintf(data, SIPBUFSIZE, "%s:%d:%s:%s",
ast_sockaddr_stringify(&peer->addr), expire, peer->username, peer->fullcontact)``.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ari_push.contacts import (
    ChanSipRegistration,
    ContactPolicy,
    ContactRejected,
    parse_chan_sip_registry,
    parse_contact,
)
from ari_push.model import Dialect, PushParams

T1 = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0"
ZOIPER_URL = "http://db3.notify.live.net/throttledthirdparty/01.00/AQEVPwmdC_zuSZiednVGrPo6AgAAAAADOwAAAAQUZm52OkE0"


def stored(addr: str, expire: int, username: str, fullcontact: str) -> str:
    """What chan_sip writes (addr is already ast_sockaddr_stringify's host:port / [v6]:port)."""
    return f"{addr}:{expire}:{username}:{fullcontact}"


LINPHONE_VALUE = stored(
    "203.0.113.7:41234", 600, "1002",
    f"sip:1002@203.0.113.7:41234;transport=tcp;app-id=org.linphone.phone.voip.prod;pn-type=apple;pn-tok={T1}",
)
ZOIPER_CONTACT = f"sip:909@10.8.3.36:52685;rinstance=0667df2a9c36ce63;transport=UDP;X-PUSH-URI={ZOIPER_URL}"
ZOIPER_VALUE = stored("10.8.3.36:52685", 120, "909", ZOIPER_CONTACT)


RECORDED = [
    pytest.param(
        "192.168.1.20:5060:3600:1001:sip:1001@192.168.1.20:5060",
        ChanSipRegistration("192.168.1.20", 5060, 3600, "1001", "sip:1001@192.168.1.20:5060"),
        id="desk-phone",
    ),
    pytest.param(
        LINPHONE_VALUE,
        ChanSipRegistration("203.0.113.7", 41234, 600, "1002",
                            f"sip:1002@203.0.113.7:41234;transport=tcp;app-id=org.linphone.phone.voip.prod;"
                            f"pn-type=apple;pn-tok={T1}"),
        id="linphone-legacy",
    ),
    pytest.param(
        ZOIPER_VALUE,
        ChanSipRegistration("10.8.3.36", 52685, 120, "909", ZOIPER_CONTACT),
        id="zoiper",
    ),
    pytest.param(
        "[2001:db8::15]:5060:3600:1003:sip:1003@[2001:db8::15]:5060;transport=udp",
        ChanSipRegistration("2001:db8::15", 5060, 3600, "1003", "sip:1003@[2001:db8::15]:5060;transport=udp"),
        id="ipv6",
    ),
    pytest.param(
        "[2001:DB8:0:0::15]:5062:60:1003:sips:1003@[2001:db8::15]:5062",
        ChanSipRegistration("2001:db8::15", 5062, 60, "1003", "sips:1003@[2001:db8::15]:5062"),
        id="ipv6-normalised",
    ),
    pytest.param(
        "198.51.100.4:5060:60::sip:198.51.100.4:5060",  # contact without a user part: username empty
        ChanSipRegistration("198.51.100.4", 5060, 60, "", "sip:198.51.100.4:5060"),
        id="empty-username",
    ),
    pytest.param(
        "198.51.100.4:5060:60:alice:secret:sip:alice@198.51.100.4",  # userinfo "alice:secret" as username
        ChanSipRegistration("198.51.100.4", 5060, 60, "alice:secret", "sip:alice@198.51.100.4"),
        id="username-with-colon",
    ),
    pytest.param(
        "198.51.100.4:5060:60:1004:SIP:1004@198.51.100.4;transport=UDP\r\n",  # AMI DBGet Val: with CRLF
        ChanSipRegistration("198.51.100.4", 5060, 60, "1004", "SIP:1004@198.51.100.4;transport=UDP"),
        id="trailing-crlf",
    ),
    pytest.param(
        "198.51.100.4:5060:60:1005:tel:+331234",  # no sip: contact: chan_sip's own first-colon split
        ChanSipRegistration("198.51.100.4", 5060, 60, "1005", "tel:+331234"),
        id="first-colon-fallback",
    ),
]


@pytest.mark.parametrize(("value", "expected"), RECORDED)
def test_recorded_values(value: str, expected: ChanSipRegistration) -> None:
    assert parse_chan_sip_registry(value) == expected


def test_contact_feeds_parse_contact() -> None:
    linphone = parse_chan_sip_registry(LINPHONE_VALUE)
    assert parse_contact(linphone.contact, ContactPolicy()) == PushParams(
        provider="apns", token=T1, param="org.linphone.phone.voip", dialect=Dialect.LINPHONE)
    zoiper = parse_chan_sip_registry(ZOIPER_VALUE)
    push = parse_contact(zoiper.contact, ContactPolicy(vendor_allowed_hosts=("*.notify.live.net",)))
    assert push == PushParams(provider="vendor", token=ZOIPER_URL, dialect=Dialect.ZOIPER)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("", "value"),
        ("   ", "value"),
        ("10.0.0.1", "address"),
        ("10.0.0.1:5060", "port"),
        ("10.0.0.1:5060:60", "expiry"),
        ("10.0.0.1:5060:60:u", "contact"),
        ("10.0.0.1:5060:60:u:", "contact"),
        ("10.0.0.1:5060:abc:u:sip:u@h", "expiry"),
        ("10.0.0.1:5060:-5:u:sip:u@h", "expiry"),
        ("10.0.0.1:5060:99999999999:u:sip:u@h", "expiry"),
        ("10.0.0.1:0:60:u:sip:u@h", "port"),
        ("10.0.0.1:70000:60:u:sip:u@h", "port"),
        ("10.0.0.1::60:u:sip:u@h", "port"),
        ("pbx.example.com:5060:60:u:sip:u@h", "address"),  # ast_sockaddr_stringify is always numeric
        ("999.1.1.1:5060:60:u:sip:u@h", "address"),
        ("010.0.0.1:5060:60:u:sip:u@h", "address"),
        ("[2001:db8::1:5060:60:u:sip:u@h", "address"),
        ("[2001:db8::1]5060:60:u:sip:u@h", "address"),
        ("[not-v6]:5060:60:u:sip:u@h", "address"),
        ("2001:db8::1:5060:60:u:sip:u@h", "address"),  # IPv6 without brackets is not what chan_sip writes
        ("10.0.0.1:5060:60:u:sip:u@h\nEvent: Fake", "value"),
        ("10.0.0.1:5060:60:u u:sip:u@h", "value"),
        ("10.0.0.1:5060:60:u:sip:u@h;x=" + "a" * 500, "value"),  # over SIPBUFSIZE - 1
    ],
)
def test_malformed_values(value: str, field: str) -> None:
    with pytest.raises(ContactRejected) as info:
        parse_chan_sip_registry(value)
    assert info.value.reason == "bad-registry"
    assert info.value.field == field
    assert "sip:u@h" not in str(info.value)  # the contact (push tokens) never lands in the message


def test_longest_value_chan_sip_can_store() -> None:
    head = "10.0.0.1:5060:60:u:sip:u@h;x="
    value = head + "a" * (511 - len(head))
    assert parse_chan_sip_registry(value).contact.endswith("a")
    with pytest.raises(ContactRejected):
        parse_chan_sip_registry(value + "a")


ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(lambda ip: (str(ip), str(ip))),
    st.ip_addresses(v=6).map(lambda ip: (f"[{ip.exploded}]", str(ip))),
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    addr=ADDRESSES,
    port=st.integers(1, 65535),
    expire=st.integers(0, 10**6),
    username=st.text(alphabet="abcXYZ0189_.-+", max_size=20),
    contact_tail=st.text(alphabet="abcXYZ0189_.-+:;=@[]/", max_size=100),
    scheme=st.sampled_from(["sip", "sips", "SIP"]),
)
def test_round_trip(addr: tuple[str, str], port: int, expire: int, username: str, contact_tail: str,
                    scheme: str) -> None:
    shown, normal = addr
    contact = f"{scheme}:{contact_tail}"
    reg = parse_chan_sip_registry(stored(f"{shown}:{port}", expire, username, contact))
    assert reg == ChanSipRegistration(normal, port, expire, username, contact)
    assert ipaddress.ip_address(reg.address)


@settings(max_examples=400, deadline=None, database=None)
@given(text=st.one_of(st.text(max_size=600), st.text(alphabet=":[]0123456789abcdef.sip@ ", max_size=80)))
def test_never_raises_anything_else(text: str) -> None:
    try:
        reg = parse_chan_sip_registry(text)
    except ContactRejected as exc:
        assert exc.reason == "bad-registry"
    else:
        assert 0 < reg.port < 65536 and reg.expiry >= 0 and reg.contact
        assert ipaddress.ip_address(reg.address)
