"""contacts.parse_contact / contact_parts / ContactPolicy on recorded and crafted contact URIs.

The URIs of asterisk-behaviour.md section 1.8 are used as Asterisk reported them; where the note
elides a part ("…"), the lab prefix and a well-formed token of the same shape fill it in.
"""

from __future__ import annotations

import pytest

from ari_push.contacts import (
    REASONS,
    ContactParts,
    ContactPolicy,
    ContactRejected,
    contact_parts,
    parse_contact,
)
from ari_push.model import Dialect, PushParams
from ari_push.settings import CaptureSettings

# 64-hex APNs tokens: the lab's real one, and two made up in the shapes the note elides.
T1 = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0"
T2 = "5c1a" + "0123456789abcdef" * 3 + "8899aabb" + "6d7c"
T3 = "9f8E7D6c5B4a39281706f5e4d3c2b1a0" * 2  # mixed case, kept as sent
FCM = "dQw4w9WgXcQ:APA91bH-abc_DEF123"
FCM2 = "cAbCdEf123:APA91bHxyz-_AbC_xyz-123"
ZOIPER_URL = (
    "http://db3.notify.live.net/throttledthirdparty/01.00/"
    "AQEVPwmdC_zuSZiednVGrPo6AgAAAAADOwAAAAQUZm52OkE0QUNBREI0MTdBQzBCNjQFBlVTTkMwMQ"
)
ZOIPER_SEED = (
    "Contact: <sip:909@10.8.3.36:52685;rinstance=0667df2a9c36ce63;transport=UDP;"
    f"X-PUSH-URI={ZOIPER_URL}>"
)
LAB = "sip:1001@127.0.0.1:5401;transport=udp"

POLICY = ContactPolicy(
    vendor_allowed_hosts=("*.notify.live.net", "push.zoiper.example:8080", "push.example.com"),
    extra_providers=("wp",),
)

assert len(T2) == 64 and len(T3) == 64


def rejected(uri: str, reason: str, field: str | None = None, secret: str | None = None,
             policy: ContactPolicy = POLICY) -> ContactRejected:
    """Assert the rejection, and that its text shows neither the whole secret nor the URI."""
    with pytest.raises(ContactRejected) as info:
        parse_contact(uri, policy)
    exc = info.value
    assert exc.reason == reason, str(exc)
    assert exc.reason in REASONS
    if field is not None:
        assert exc.field == field, str(exc)
    text = str(exc)
    assert text.startswith(reason)
    if secret is not None:
        assert secret not in text
    if len(uri) > 12:
        assert uri not in text
    assert all(c.isprintable() for c in text)
    return exc


# ---------------------------------------------------------------- asterisk-behaviour.md 1.1 / 1.6 / 1.8

ACCEPTED_RECORDED = [
    pytest.param(
        f"sip:1001@127.0.0.1:5201;transport=udp;pn-provider=apns;pn-prid={T1};pn-param=ABCD1234.com.example.voip",
        PushParams(provider="apns", token=T1, param="com.example.voip"),
        id="1.1-rfc8599-apns",
    ),
    pytest.param(
        f"{LAB};rinstance=7f3a9c2b1e0d4f5a;X-PUSH-URI=http://push.zoiper.example:8080/zp/v1/abc123/def",
        PushParams(provider="vendor", token="http://push.zoiper.example:8080/zp/v1/abc123/def",
                   dialect=Dialect.ZOIPER),
        id="1.8-zoiper-identical",
    ),
    pytest.param(
        f"{LAB};x-push-uri=https://push.example.com/v1/dev%3fid%3d42&k%3dv",
        PushParams(provider="vendor", token="https://push.example.com/v1/dev?id=42&k=v", dialect=Dialect.ZOIPER),
        id="1.8-x-push-uri-normalised",
    ),
    pytest.param(
        f"{LAB};app-id=org.linphone.phone.voip.prod;pn-type=apple;pn-tok={T2};pn-msg-str=IM_MSG;pn-call-str=IC_MSG;"
        "pn-groupchat-str=GC_MSG;pn-call-snd=notes_of_the_optimistic.caf;pn-msg-snd=msg.caf;pn-silent=1",
        PushParams(
            provider="apns", token=T2, param="org.linphone.phone.voip", sandbox=False, dialect=Dialect.LINPHONE,
            options=(("pn-call-snd", "notes_of_the_optimistic.caf"), ("pn-call-str", "IC_MSG"),
                     ("pn-groupchat-str", "GC_MSG"), ("pn-msg-snd", "msg.caf"), ("pn-msg-str", "IM_MSG"),
                     ("pn-silent", "1")),
        ),
        id="1.8-linphone-legacy-apple",
    ),
    pytest.param(
        f"{LAB};app-id=929724111839;pn-type=firebase;pn-tok={FCM};pn-silent=1;pn-timeout=0",
        PushParams(provider="fcm", token=FCM, param="929724111839", dialect=Dialect.LINPHONE,
                   options=(("pn-silent", "1"), ("pn-timeout", "0"))),
        id="1.8-linphone-legacy-firebase",
    ),
    pytest.param(
        f"{LAB};pn-provider=fcm;pn-prid={FCM2};pn-param=my-project-id",
        PushParams(provider="fcm", token=FCM2, param="my-project-id"),
        id="1.8-rfc8599-fcm",
    ),
    pytest.param(
        f"sip:1007@127.0.0.1:5901;pn-provider=apns;pn-prid={T1};pn-param=ABCD1234.com.example.voip;"
        "x-ast-orig-host=10.1.2.3:5060",
        PushParams(provider="apns", token=T1, param="com.example.voip"),
        id="1.8-rewrite-contact-udp",
    ),
    pytest.param(
        f"sip:1007@127.0.0.1:37676;transport=TCP;pn-provider=apns;pn-prid={T1};pn-param=ABCD1234.com.example.voip;"
        "x-ast-orig-host=10.1.2.3:5060",
        PushParams(provider="apns", token=T1, param="com.example.voip"),
        id="1.8-rewrite-contact-tcp",
    ),
    pytest.param(
        f"{LAB.replace('udp', 'UDP')};PN-Provider=APNS;Pn-Prid={T3};pn-param=T.com.x;ob;pn-silent",
        # T.com.x has no service suffix: Flexisip reads it as team T, bundle com.x, "remote".
        PushParams(provider="apns", token=T3, param="com.x", options=(("pn-silent", ""),)),
        id="1.8-case-mixed-valueless-with-a-real-token",
    ),
]


@pytest.mark.parametrize(("uri", "expected"), ACCEPTED_RECORDED)
def test_recorded_contacts_accepted(uri: str, expected: PushParams) -> None:
    assert parse_contact(uri, POLICY) == expected


REJECTED_RECORDED = [
    # The lab used placeholder tokens; they are not APNs tokens and must not become bindings.
    pytest.param(
        f"{LAB};pn-provider=apns.dev;pn-prid=ABCDEF0123456789:voip&9876543210FEDCBA:remote;"
        "pn-param=ABCD1234.org.linphone.phone.voip&remote;pn-silent=1;pn-timeout=0",
        "token-alphabet", "pn-prid", "ABCDEF0123456789", id="1.8-dual-placeholder-tokens",
    ),
    pytest.param(
        f"{LAB.replace('udp', 'UDP')};PN-Provider=APNS;Pn-Prid=AbCd;pn-param=T.com.x;ob;pn-silent",
        "token-alphabet", "pn-prid", "AbCd", id="1.8-case-mixed",
    ),
    pytest.param(
        "sip:1007@127.0.0.1:5901;pn-provider=apns;pn-prid=TOKR;pn-param=ABCD1234.com.example.voip;"
        "x-ast-orig-host=10.1.2.3:5060",
        "token-alphabet", "pn-prid", "TOKR", id="1.8-rewrite-placeholder",
    ),
    pytest.param(
        "sip:1002@127.0.0.1:5301;transport=udp;pn-provider=apns;pn-prid=TOK5301;pn-param=ABCD1234.com.example.voip",
        "token-alphabet", "pn-prid", "TOK5301", id="1.6-qualify-placeholder",
    ),
    pytest.param(
        f"{LAB};pn-provider=fcm;pn-prid=abc:def/ghi%40x%3d1&y%20z;pn-param=TEAM.comAexample",
        "token-alphabet", "pn-prid", "abc:def/ghi@x=1&y z", id="1.8-escapes-as-fcm",
    ),
]


@pytest.mark.parametrize(("uri", "reason", "field", "secret"), REJECTED_RECORDED)
def test_recorded_contacts_rejected(uri: str, reason: str, field: str, secret: str) -> None:
    rejected(uri, reason, field, secret)


def test_dual_apple_tokens() -> None:
    uri = (f"{LAB};pn-provider=apns.dev;pn-prid={T1}:voip&{T2}:remote;"
           "pn-param=ABCD1234.org.linphone.phone.voip&remote;pn-silent=1;pn-timeout=0")
    push = parse_contact(uri, POLICY)
    assert push == PushParams(
        provider="apns", token=T1, param="org.linphone.phone.voip", sandbox=True,
        extra_tokens=(("remote", T2),), options=(("pn-silent", "1"), ("pn-timeout", "0")),
    )


def test_dual_apple_tokens_in_any_order() -> None:
    a = parse_contact(f"{LAB};pn-provider=apns;pn-prid={T2}:remote&{T1}:voip;pn-param=TEAM1.org.x.remote&voip", POLICY)
    b = parse_contact(f"{LAB};pn-provider=apns;pn-prid={T1}:voip&{T2}:remote;pn-param=TEAM1.org.x.voip&remote", POLICY)
    assert a == b
    assert a is not None and a.token == T1 and a.param == "org.x.voip" and a.extra_tokens == (("remote", T2),)


@pytest.mark.parametrize(
    ("prid", "param", "token", "topic"),
    [
        (T1, "ABCD1234.com.example.voip", T1, "com.example.voip"),  # one token, implied service
        (f"{T1}:voip", "ABCD1234.com.example.voip", T1, "com.example.voip"),
        (f"{T1}:remote", "ABCD1234.com.example.remote", T1, "com.example"),
        (T1, "ABCD1234.com.example", T1, "com.example"),  # no service list: remote (alert) topic
        (T1, "ABCDE12345.com.example.app.voip", T1, "com.example.app.voip"),
    ],
)
def test_apns_topic_is_bundle_plus_voip(prid: str, param: str, token: str, topic: str) -> None:
    push = parse_contact(f"{LAB};pn-provider=apns;pn-prid={prid};pn-param={param}", POLICY)
    assert push is not None
    assert (push.token, push.param, push.extra_tokens, push.sandbox) == (token, topic, (), False)


def test_apns_dev_is_sandbox() -> None:
    push = parse_contact(f"{LAB};pn-provider=APNS.DEV;pn-prid={T1};pn-param=ABCD1234.com.example.voip", POLICY)
    assert push is not None and push.provider == "apns" and push.sandbox is True


@pytest.mark.parametrize(
    ("app_id", "topic", "sandbox"),
    [
        ("org.linphone.phone.voip.prod", "org.linphone.phone.voip", False),
        ("org.linphone.phone.voip.dev", "org.linphone.phone.voip", True),
        ("org.linphone.phone.dev", "org.linphone.phone", True),
        ("org.linphone.phone.voip", "org.linphone.phone.voip", False),  # no suffix: kept, no .voip added
        ("com.example.app", "com.example.app", False),
    ],
)
def test_legacy_apple_app_id(app_id: str, topic: str, sandbox: bool) -> None:
    push = parse_contact(f"{LAB};pn-type=apple;pn-tok={T1};app-id={app_id}", POLICY)
    assert push == PushParams(provider="apns", token=T1, param=topic, sandbox=sandbox, dialect=Dialect.LINPHONE)


@pytest.mark.parametrize("pn_type", ["google", "firebase", "android", "Firebase", "GOOGLE"])
def test_legacy_android_types_map_to_fcm(pn_type: str) -> None:
    push = parse_contact(f"{LAB};pn-type={pn_type};pn-tok={FCM};app-id=929724111839", POLICY)
    assert push == PushParams(provider="fcm", token=FCM, param="929724111839", dialect=Dialect.LINPHONE)


def test_extra_provider_in_both_dialects() -> None:
    rfc = parse_contact(f"{LAB};pn-provider=WP;pn-prid=abc.DEF_123~x;pn-param=app1", POLICY)
    legacy = parse_contact(f"{LAB};pn-type=wp;pn-tok=abc.DEF_123~x;app-id=app1", POLICY)
    assert rfc == PushParams(provider="wp", token="abc.DEF_123~x", param="app1")
    assert legacy == PushParams(provider="wp", token="abc.DEF_123~x", param="app1", dialect=Dialect.LINPHONE)
    no_param = parse_contact(f"{LAB};pn-provider=wp;pn-prid=tok", POLICY)
    assert no_param == PushParams(provider="wp", token="tok")


def test_webpush_subscription_url() -> None:
    url = "https://fcm.googleapis.com/fcm/send/cAbCdEf123:APA91bHxyz"
    push = parse_contact(f"{LAB};pn-provider=webpush;pn-prid={url}", POLICY)
    assert push == PushParams(provider="webpush", token=url)
    apple = "https://web.push.apple.com/QGuQyavXutnMH"
    assert parse_contact(f"{LAB};pn-provider=webpush;pn-prid={apple}", POLICY) == PushParams("webpush", apple)


def test_pn_purr_is_kept() -> None:
    push = parse_contact(f"{LAB};pn-provider=fcm;pn-prid={FCM};pn-param=p1;pn-purr=Abc-123.x~y", POLICY)
    assert push is not None and push.purr == "Abc-123.x~y"


def test_rfc8599_and_legacy_that_agree() -> None:
    uri = (f"{LAB};pn-provider=apns;pn-prid={T1}:voip&{T2}:remote;pn-param=TEAM1.org.x.voip&remote;"
           f"pn-type=apple;pn-tok={T2.upper()};app-id=org.x.prod")
    push = parse_contact(uri, POLICY)
    assert push is not None and push.dialect is Dialect.RFC8599 and push.token == T1
    fcm = parse_contact(f"{LAB};pn-provider=fcm;pn-prid={FCM};pn-param=123;pn-type=firebase;pn-tok={FCM};app-id=123",
                        POLICY)
    assert fcm == PushParams(provider="fcm", token=FCM, param="123")


# ---------------------------------------------------------------- Zoiper


def test_zoiper_seed_round_trips() -> None:
    for hosts in (("db3.notify.live.net",), ("*.notify.live.net",), ("DB3.Notify.Live.Net.",)):
        push = parse_contact(ZOIPER_SEED, ContactPolicy(vendor_allowed_hosts=hosts))
        assert push == PushParams(provider="vendor", token=ZOIPER_URL, dialect=Dialect.ZOIPER)
    bare = ZOIPER_SEED.removeprefix("Contact: <").removesuffix(">")
    assert parse_contact(bare, POLICY) == parse_contact(ZOIPER_SEED, POLICY)
    parts = contact_parts(ZOIPER_SEED)
    assert (parts.user, parts.host, parts.port) == ("909", "10.8.3.36", 52685)
    assert parts.param("x-push-uri") == ZOIPER_URL
    assert parts.param("transport") == "UDP"


def test_zoiper_disabled_without_allow_list() -> None:
    rejected(ZOIPER_SEED, "vendor-disabled", "x-push-uri", ZOIPER_URL, policy=ContactPolicy())


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://evil.example/x", "evil.example"),
        ("http://notify.live.net/x", "notify.live.net"),  # the wildcard covers subdomains only
        ("http://xnotify.live.net/x", "xnotify.live.net"),
        ("http://db3.notify.live.net.evil.example/x", "db3.notify.live.net.evil.example"),
        ("HTTP://EVIL.example:8080/x", "evil.example"),
        ("http://127.0.0.1/x", "127.0.0.1"),
        ("http://[::1]:8080/x", "::1"),
    ],
)
def test_zoiper_host_not_allowed(url: str, host: str) -> None:
    exc = rejected(f"{LAB};X-PUSH-URI={url}", "vendor-host-not-allowed", "x-push-uri", url)
    assert repr(host) in str(exc)  # the operator is told which host to allow, not the URL


def test_zoiper_ip_literal_allowed_only_exactly() -> None:
    policy = ContactPolicy(vendor_allowed_hosts=("10.0.0.7:8080",))
    assert parse_contact(f"{LAB};x-push-uri=http://10.0.0.7:8080/p", policy) == PushParams(
        provider="vendor", token="http://10.0.0.7:8080/p", dialect=Dialect.ZOIPER)
    rejected(f"{LAB};x-push-uri=http://10.0.0.8/p", "vendor-host-not-allowed", policy=policy)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://db3.notify.live.net/x", "vendor-scheme"),
        ("javascript:alert(1)", "vendor-scheme"),
        ("file:///etc/passwd", "vendor-scheme"),
        ("http://user:pw@db3.notify.live.net/x", "vendor-userinfo"),
        ("http://db3.notify.live.net@evil.example/x", "vendor-userinfo"),
        ("http://db3.notify.live.net/a%20b", "vendor-url"),  # a space, once decoded
        ("http://db3.notify.live.net/a%0d%0aX:1", "vendor-url"),  # CRLF injection
        ("http://db3.notify.live.net/%C3%A9", "vendor-url"),  # non-ASCII
        ("http:/db3.notify.live.net/x", "vendor-url"),
        ("http://db3.notify.live.net:0/x", "vendor-url"),
        ("http://db3.notify.live.net:99999/x", "vendor-url"),
        ("http://[::1/x", "vendor-url"),
        ("http://db3%2enotify.live.net/x".replace("%2e", "%252e"), "vendor-url"),
    ],
)
def test_zoiper_bad_urls(url: str, reason: str) -> None:
    rejected(f"{LAB};x-push-uri={url}", reason, "x-push-uri", url)


def test_zoiper_url_too_long() -> None:
    url = "http://db3.notify.live.net/" + "a" * 460
    assert len(url) == 487
    rejected(f"sip:a@h;x-push-uri={url}", "too-long", "x-push-uri", url)


def test_vendor_url_is_decoded_exactly_once() -> None:
    push = parse_contact(f"{LAB};x-push-uri=http://db3.notify.live.net/a%252Fb", POLICY)
    assert push is not None and push.token == "http://db3.notify.live.net/a%2Fb"


# ---------------------------------------------------------------- percent-decoding and names


def test_asterisk_normalised_and_sent_forms_read_the_same() -> None:
    sent = f"{LAB};x-push-uri=https%3A%2F%2Fpush.example.com%2Fv1%2Fdev%3Fid%3D42%26k%3Dv"
    reported = f"{LAB};x-push-uri=https://push.example.com/v1/dev%3fid%3d42&k%3dv"
    assert parse_contact(sent, POLICY) == parse_contact(reported, POLICY)
    sent_parts = contact_parts(f"{LAB};pn-prid=abc%3Adef%2Fghi%40x%3D1%26y%20z;pn-param=TEAM%2Ecom%41example")
    reported_parts = contact_parts(f"{LAB};pn-prid=abc:def/ghi%40x%3d1&y%20z;pn-param=TEAM.comAexample")
    assert sent_parts == reported_parts
    assert reported_parts.param("pn-prid") == "abc:def/ghi@x=1&y z"
    assert reported_parts.param("pn-param") == "TEAM.comAexample"


def test_escaped_values_and_names() -> None:
    escaped = "".join(f"%{ord(c):02x}" for c in T1)
    push = parse_contact(f"{LAB};pn%2Dprovider=apns;PN-PRID={escaped};pn-param=ABCD1234%2Ecom.example%2evoip", POLICY)
    assert push == PushParams(provider="apns", token=T1, param="com.example.voip")


@pytest.mark.parametrize(
    ("value", "field"),
    [("%zz", "pn-prid"), ("abc%4", "pn-prid"), ("%C3%28", "pn-prid"), ("%ff%fe", "pn-prid")],
)
def test_bad_escape(value: str, field: str) -> None:
    rejected(f"{LAB};pn-provider=fcm;pn-prid={value};pn-param=p", "bad-escape", field)


def test_bad_escape_outside_push_params_is_not_our_business() -> None:
    assert parse_contact(f"{LAB};x-foo=%zz;%zz=1;ob", POLICY) is None
    with pytest.raises(ContactRejected) as info:
        contact_parts(f"{LAB};x-foo=%zz")
    assert info.value.reason == "bad-escape"


def test_valueless_and_empty_params() -> None:
    assert parse_contact(f"{LAB};ob;lr;;;x=", POLICY) is None
    push = parse_contact(f"{LAB};pn-provider=fcm;pn-prid={FCM};pn-param=p;pn-silent;pn-timeout=", POLICY)
    assert push is not None and push.options == (("pn-silent", ""), ("pn-timeout", ""))


# ---------------------------------------------------------------- no push parameters


@pytest.mark.parametrize(
    "uri",
    [
        "sip:1001@127.0.0.1:5060",
        "sip:1001@127.0.0.1:5060;transport=udp;rinstance=7f3a9c2b1e0d4f5a",
        "SIPS:1001@example.com;transport=tls;ob",
        "sip:127.0.0.1",
        "sip:1001@[::1]:5060",
        "<sip:1001@[2001:db8::1]>;+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>\";reg-id=1",
        '"Desk Phone" <sip:1001@10.0.0.9:5060;user=phone>;expires=3600',
        "sip:+331234;npdi@example.com;user=phone?subject=pn-prid",
        "  sip:1001@h  ",
    ],
)
def test_no_push_parameters(uri: str) -> None:
    assert parse_contact(uri, POLICY) is None


# ---------------------------------------------------------------- every rejection reason


@pytest.mark.parametrize(
    "uri",
    [
        "", "   ", "tel:+14155550100", "http://example.com/", "sip:", "sip:@h", "sip:a@", "sip:a@h:", "sip:a@h:0",
        "sip:a@h:99999", "sip:a@h:5060x", "sip:a@[::1", "sip:a@[zz::q]", "sip:a@[::1]x", "sip:a@h;=x", "sip:a@h;=",
        "sip:a b@h", "sip:a@h\x00", "sip:a@hé", "<sip:a@h", "sip:a@h>", "sip:a@h;x=\"y\"", "sip:a@ho/st", "=", ";;;",
        "sip:a@h%41", "sips:user@host:70000",
    ],
)
def test_bad_uri(uri: str) -> None:
    rejected(uri, "bad-uri")


def test_uri_length_limit_is_asteriskss_511() -> None:
    head = f"sip:1001@127.0.0.1:5201;pn-provider=apns;pn-prid={T1};pn-param=ABCD1234.com.example.voip;x-pad="
    uri_511 = head + "a" * (511 - len(head))
    assert len(uri_511) == 511
    assert parse_contact(uri_511, POLICY) == PushParams(provider="apns", token=T1, param="com.example.voip")
    assert parse_contact(f"<{uri_511}>", POLICY) is not None  # the brackets do not count
    exc = rejected(uri_511 + "a", "too-long", "uri", T1)
    assert "512" in str(exc)
    rejected("sip:" + "a" * 10_000_000, "too-long", "uri")


@pytest.mark.parametrize(
    ("uri", "field", "secret"),
    [
        (f"{LAB};pn-provider=apns;pn-prid={T1}ab;pn-param=T.com.x.voip", "pn-prid", f"{T1}ab"),  # 66 > 64
        (f"sip:a@h;pn-provider=fcm;pn-param=p;pn-prid={'A' * 401}", "pn-prid", "A" * 401),
        (f"{LAB};pn-type=firebase;app-id=1;pn-tok={'A' * 401}", "pn-tok", "A" * 401),
        (f"{LAB};pn-provider=wp;pn-prid={'A' * 257}", "pn-prid", "A" * 257),
        (f"{LAB};pn-provider=fcm;pn-prid={FCM};pn-param={'p' * 129}", "pn-param", None),
        (f"{LAB};pn-provider=apns;pn-prid={T1};pn-param=T.{'b' * 156}.voip", "pn-param", None),
        (f"{LAB};pn-provider=fcm;pn-prid={FCM};pn-param=p;pn-call-str={'X' * 65}", "pn-call-str", None),
        (f"{LAB};pn-provider=fcm;pn-prid={FCM};pn-param=p;pn-purr={'x' * 129}", "pn-purr", None),
    ],
)
def test_too_long_values(uri: str, field: str, secret: str | None) -> None:
    rejected(uri, "too-long", field, secret)


def test_duplicate_param() -> None:
    rejected(f"{LAB};pn-provider=fcm;pn-prid={FCM};pn-param=p;PN-PRID={FCM2}", "duplicate-param", "pn-prid", FCM)
    rejected(f"{LAB};pn-provider=fcm;pn-prid={FCM};pn-param=p;pn-silent;pn-silent=1", "duplicate-param", "pn-silent")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("pn-type=firebase", "pn-type"),
        (f"pn-tok={T3}", "pn-tok"),
        ("app-id=org.other.voip.prod", "app-id"),
        ("app-id=com.example.voip.prod", "app-id"),  # topic matches, sandbox does not (apns.dev)
        ("pn-type=blackberry", "pn-type"),
    ],
)
def test_conflicting_rfc8599_and_legacy(extra: str, field: str) -> None:
    uri = f"{LAB};pn-provider=apns.dev;pn-prid={T1};pn-param=ABCD1234.com.example.voip;{extra}"
    rejected(uri, "conflicting-params", field, T1)


def test_conflicting_fcm_app_id_and_vendor_beside_pn() -> None:
    rejected(f"{LAB};pn-provider=fcm;pn-prid={FCM};pn-param=p1;app-id=p2", "conflicting-params", "app-id")
    rejected(f"{LAB};pn-provider=fcm;pn-prid={FCM};pn-param=p1;x-push-uri={ZOIPER_URL}",
             "conflicting-params", "x-push-uri", ZOIPER_URL)
    rejected(f"{LAB};pn-type=apple;pn-tok={T1};app-id=a.b;X-PUSH-URI={ZOIPER_URL}",
             "conflicting-params", "x-push-uri", ZOIPER_URL)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ("pn-provider=gcm;pn-prid=x;pn-param=p", "pn-provider"),
        ("pn-provider=firebase;pn-prid=x;pn-param=p", "pn-provider"),  # Flexisip refuses it too
        ("pn-provider=vendor;pn-prid=x", "pn-provider"),
        ("pn-provider=apns.prod;pn-prid=x", "pn-provider"),
        ("pn-provider=%00evil%0a;pn-prid=x", "pn-provider"),
        ("pn-type=blackberry;pn-tok=x;app-id=y", "pn-type"),
        ("pn-type=fcm;pn-tok=x;app-id=y", "pn-type"),  # not a Linphone pn-type
    ],
)
def test_unknown_provider(params: str, field: str) -> None:
    exc = rejected(f"{LAB};{params}", "unknown-provider", field)
    assert "\n" not in str(exc) and "\x00" not in str(exc)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (f"pn-prid={T1};pn-param=T.com.x.voip", "pn-provider"),
        ("pn-provider;pn-prid=x", "pn-provider"),
        ("pn-provider=;pn-prid=x", "pn-provider"),
        (f"pn-tok={T1};app-id=com.x", "pn-type"),
        ("app-id=com.x", "pn-type"),
        ("pn-silent=1;pn-timeout=0", "pn-silent"),
        ("pn-purr=abc", "pn-purr"),
    ],
)
def test_missing_provider(params: str, field: str) -> None:
    rejected(f"{LAB};{params}", "missing-provider", field)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ("pn-provider=apns;pn-param=T.com.x.voip", "pn-prid"),
        ("pn-provider=apns;pn-prid;pn-param=T.com.x.voip", "pn-prid"),
        ("pn-provider=fcm;pn-prid=;pn-param=p", "pn-prid"),
        (f"pn-provider=apns;pn-prid=:voip&{T2}:remote;pn-param=T.com.x.voip&remote", "pn-prid"),
        ("pn-type=apple;app-id=com.x", "pn-tok"),
        ("pn-type=apple;pn-tok=;app-id=com.x", "pn-tok"),
        ("x-push-uri=", "x-push-uri"),
        ("X-PUSH-URI", "x-push-uri"),
    ],
)
def test_missing_token(params: str, field: str) -> None:
    rejected(f"{LAB};{params}", "missing-token", field)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (f"pn-provider=apns;pn-prid={T1}", "pn-param"),
        (f"pn-provider=apns;pn-prid={T1};pn-param=", "pn-param"),
        (f"pn-provider=fcm;pn-prid={FCM}", "pn-param"),
        (f"pn-type=apple;pn-tok={T1}", "app-id"),
        (f"pn-type=google;pn-tok={FCM};app-id", "app-id"),
    ],
)
def test_missing_param(params: str, field: str) -> None:
    rejected(f"{LAB};{params}", "missing-param", field)


def test_webpush_refuses_pn_param() -> None:
    url = "https://fcm.googleapis.com/fcm/send/abc"
    rejected(f"{LAB};pn-provider=webpush;pn-prid={url};pn-param=x", "param-not-allowed", "pn-param", url)


@pytest.mark.parametrize(
    "params",
    [
        f"pn-prid={T1};pn-param=T.com.x.voip&remote",  # one token, two services
        f"pn-prid={T1}:voip&{T2}:remote;pn-param=T.com.x.voip",  # two tokens, one service
        f"pn-prid={T1}:remote;pn-param=T.com.x.voip",
        f"pn-prid={T1}:voip&{T2}:voip;pn-param=T.com.x.voip&remote",
        f"pn-prid={T1}:voip&{T2};pn-param=T.com.x.voip&remote",
        f"pn-prid={T1}:voip&{T2}:remote;pn-param=T.com.x.voip&voip",
        f"pn-prid={T1}:alert;pn-param=T.com.x.voip",
    ],
)
def test_service_mismatch(params: str) -> None:
    rejected(f"{LAB};pn-provider=apns;{params}", "service-mismatch", secret=T1)


@pytest.mark.parametrize(
    ("params", "field", "secret"),
    [
        ("pn-provider=apns;pn-prid=zz" + T1[2:] + ";pn-param=T.com.x.voip", "pn-prid", "zz" + T1[2:]),
        ("pn-provider=apns;pn-prid=" + T1[:62] + ";pn-param=T.com.x.voip", "pn-prid", T1[:62]),
        # both halves bad (one bad half keeps the other: test_a_dual_token_with_one_bad_half_...)
        (f"pn-provider=apns;pn-prid={T1[:60]}:voip&{T2[:60]}:remote;pn-param=T.com.x.voip&remote", "pn-prid",
         T1[:60]),
        (f"pn-type=apple;pn-tok={T1[:63]}g;app-id=com.x", "pn-tok", T1[:63] + "g"),
        ("pn-provider=fcm;pn-prid=abc/def:APA91bH-abc_DEF123;pn-param=p", "pn-prid", "abc/def:APA91bH-abc_DEF123"),
        ("pn-provider=fcm;pn-prid=a:b:APA91bH-abc_DEF123x;pn-param=p", "pn-prid", "a:b:APA91bH-abc_DEF123x"),
        ("pn-provider=fcm;pn-prid=short:tok;pn-param=p", "pn-prid", "short:tok"),
        ("pn-provider=fcm;pn-prid=" + FCM + "%0a;pn-param=p", "pn-prid", FCM),
        ("pn-provider=wp;pn-prid=a%20b", "pn-prid", None),
        ("pn-provider=wp;pn-prid=%3Cscript%3E", "pn-prid", None),
    ],
)
def test_token_alphabet(params: str, field: str, secret: str | None) -> None:
    rejected(f"{LAB};{params}", "token-alphabet", field, secret)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (f"pn-provider=apns;pn-prid={T1};pn-param=nodots", "pn-param"),
        (f"pn-provider=apns;pn-prid={T1};pn-param=.com.x.voip", "pn-param"),
        (f"pn-provider=apns;pn-prid={T1};pn-param=AB-CD.com.x.voip", "pn-param"),
        (f"pn-provider=apns;pn-prid={T1};pn-param=T.com_x.voip", "pn-param"),
        (f"pn-provider=apns;pn-prid={T1};pn-param=T.com..x.voip", "pn-param"),
        (f"pn-provider=apns;pn-prid={T1};pn-param=T.com.x.voip&alert", "pn-param"),
        (f"pn-provider=fcm;pn-prid={FCM};pn-param=bad/project", "pn-param"),
        (f"pn-provider=fcm;pn-prid={FCM};pn-param=-p", "pn-param"),
        (f"pn-type=apple;pn-tok={T1};app-id=com.x%20y.prod", "app-id"),
        (f"pn-type=firebase;pn-tok={FCM};app-id=a%2Fb", "app-id"),
        (f"pn-provider=fcm;pn-prid={FCM};pn-param=p;pn-purr=a/b", "pn-purr"),
        (f"pn-provider=fcm;pn-prid={FCM};pn-param=p;pn-purr", "pn-purr"),
    ],
)
def test_param_alphabet(params: str, field: str) -> None:
    rejected(f"{LAB};{params}", "param-alphabet", field, T1)


@pytest.mark.parametrize("value", ["a%3Cb", "%22quoted%22", "x%0ay", "caf%C3%A9", "a:b"])
def test_option_alphabet(value: str) -> None:
    rejected(f"{LAB};pn-provider=fcm;pn-prid={FCM};pn-param=p;pn-call-snd={value}", "option-alphabet",
             "pn-call-snd", FCM)


@pytest.mark.parametrize(
    ("url", "reason", "policy"),
    [
        ("https://fcm.googleapis.com/fcm/send/x", "webpush-disabled", ContactPolicy(webpush_allowed_hosts=())),
        ("http://fcm.googleapis.com/fcm/send/x", "webpush-scheme", POLICY),
        ("https://u@fcm.googleapis.com/fcm/send/x", "webpush-userinfo", POLICY),
        ("https://fcm.googleapis.com/fcm/send/a%20b", "webpush-url", POLICY),
        ("https://evil.example/fcm/send/x", "webpush-host-not-allowed", POLICY),
        ("https://127.0.0.1/fcm/send/x", "webpush-host-not-allowed", POLICY),
        ("https://push.apple.com/x", "webpush-host-not-allowed", POLICY),  # *.push.apple.com: subdomains only
    ],
)
def test_webpush_url_rules(url: str, reason: str, policy: ContactPolicy) -> None:
    rejected(f"{LAB};pn-provider=webpush;pn-prid={url}", reason, "pn-prid", url, policy=policy)


def test_every_reason_but_the_registry_ones_is_exercised_here() -> None:
    # bad-registry lives in test_contacts_chan_sip.py; internal-error must never happen.
    exercised = {
        "bad-uri", "bad-escape", "too-long", "duplicate-param", "conflicting-params", "unknown-provider",
        "missing-provider", "missing-token", "missing-param", "param-not-allowed", "service-mismatch",
        "token-alphabet", "param-alphabet", "option-alphabet", "vendor-disabled", "vendor-scheme",
        "vendor-userinfo", "vendor-url", "vendor-host-not-allowed", "webpush-disabled", "webpush-scheme",
        "webpush-userinfo", "webpush-url", "webpush-host-not-allowed",
        "webpush-keys",  # exercised in test_contacts_huawei_webpush.py
    }
    assert REASONS - exercised == {"bad-registry", "internal-error"}


# ---------------------------------------------------------------- contact_parts


def test_contact_parts_ipv6_and_headers() -> None:
    parts = contact_parts("<sips:%2B331234@[2001:DB8::1]:5061;Transport=TLS;ob;pn-silent?Subject=x%20y>;expires=60")
    assert parts == ContactParts(
        scheme="sips", user="+331234", host="2001:db8::1", port=5061,
        params=(("transport", "TLS"), ("ob", None), ("pn-silent", None)),
    )
    assert parts.param("OB") == "" and parts.param("pn-silent") == "" and parts.param("lr") is None


def test_contact_parts_rewrite_contact() -> None:
    parts = contact_parts(f"sip:1007@127.0.0.1:5901;pn-provider=apns;pn-prid={T1};x-ast-orig-host=10.1.2.3:5060")
    assert (parts.user, parts.host, parts.port) == ("1007", "127.0.0.1", 5901)
    assert parts.param("x-ast-orig-host") == "10.1.2.3:5060"


@pytest.mark.parametrize(
    ("uri", "host", "port"),
    [("sip:[::1]:5060", "::1", 5060), ("sip:u@[::1]", "::1", None), ("SIP:U@Example.COM", "example.com", None)],
)
def test_contact_parts_hosts(uri: str, host: str, port: int | None) -> None:
    parts = contact_parts(uri)
    assert (parts.host, parts.port) == (host, port)


# ---------------------------------------------------------------- ContactPolicy


def test_policy_from_settings() -> None:
    capture = CaptureSettings(vendor_allowed_hosts=("*.notify.live.net",), extra_providers=("wp",))
    policy = ContactPolicy.from_settings(capture)
    assert policy.vendor_allowed_hosts == ("*.notify.live.net",)
    assert policy.extra_providers == ("wp",)
    assert policy.max_uri_length == 511
    assert parse_contact(ZOIPER_SEED, policy) is not None
    assert ContactPolicy.from_settings(CaptureSettings()).vendor_allowed_hosts == ()


def test_policy_normalises_and_refuses_bad_entries() -> None:
    policy = ContactPolicy(vendor_allowed_hosts=(" DB3.Notify.Live.Net. ", "*.Example.COM"), extra_providers=(" WP ",))
    assert policy.vendor_allowed_hosts == ("db3.notify.live.net", "*.example.com")
    assert policy.extra_providers == ("wp",)
    for bad in ("", "*", "*.", "a.*.b", "http://x", "u@h", "h:0", "h:x", "*.*.x", "*.com", "::1", "*.0.1"):
        with pytest.raises(ValueError):
            ContactPolicy(vendor_allowed_hosts=(bad,))
    with pytest.raises(ValueError):
        ContactPolicy(max_uri_length=0)
    with pytest.raises(ValueError):
        ContactPolicy(max_token_length=(("apns", 0),))


def test_policy_token_limits() -> None:
    policy = ContactPolicy(max_token_length=(("fcm", 30), ("*", 5)))
    assert (policy.token_limit("fcm"), policy.token_limit("wp"), policy.token_limit("apns")) == (30, 5, 5)
    rejected(f"{LAB};pn-provider=fcm;pn-prid={FCM2};pn-param=p", "too-long", "pn-prid", FCM2, policy=policy)
    # The APNs minimum stays 64 whatever the limit says; a larger limit admits longer hex tokens.
    longer = ContactPolicy(max_token_length=(("apns", 200),))
    push = parse_contact(f"{LAB};pn-provider=apns;pn-prid={T1}{T2};pn-param=T.com.x.voip", longer)
    assert push is not None and push.token == T1 + T2
    rejected(f"{LAB};pn-provider=apns;pn-prid={T1}a;pn-param=T.com.x.voip", "token-alphabet", policy=longer)


@pytest.mark.parametrize("bad", ["voip", "remote"])
def test_a_dual_token_with_one_bad_half_keeps_the_good_half_and_reports_the_other(bad: str) -> None:
    good_token, bad_token = "ab" * 32, "not-hex"
    voip, remote = (bad_token, good_token) if bad == "voip" else (good_token, bad_token)
    uri = (f"sip:1001@10.0.0.6:5060;pn-provider=apns;pn-prid={voip}:voip&{remote}:remote;"
           "pn-param=ABCDE12345.com.example.phone.voip&remote")
    notes: list[ContactRejected] = []
    push = parse_contact(uri, ContactPolicy(), notes)
    assert push is not None and push.token == good_token and push.extra_tokens == ()
    # the VoIP half lost: a remote-only device (calls as alert pushes); the remote lost: VoIP only
    assert push.param == ("com.example.phone" if bad == "voip" else "com.example.phone.voip")
    assert [n.reason for n in notes] == ["token-alphabet"]
    with pytest.raises(ContactRejected):  # both halves bad: refused whole
        parse_contact(uri.replace(good_token, "zz"), ContactPolicy())
