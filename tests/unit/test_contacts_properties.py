"""Property tests: parse_contact never raises anything but ContactRejected, accepts only values
of the documented shapes, never echoes a whole token, and is deterministic."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ari_push.contacts import (
    OPTION_NAMES,
    REASONS,
    ContactPolicy,
    ContactRejected,
    contact_parts,
    parse_contact,
)
from ari_push.model import Dialect, PushParams

FAST = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

POLICIES = [
    ContactPolicy(),
    ContactPolicy(vendor_allowed_hosts=("*.notify.live.net", "push.example.com"), extra_providers=("wp", "hms")),
    ContactPolicy(vendor_allowed_hosts=("10.0.0.7",), webpush_allowed_hosts=()),
]

PUSH_NAMES = ["pn-provider", "pn-prid", "pn-param", "pn-purr", "pn-type", "pn-tok", "app-id", "x-push-uri",
              *sorted(OPTION_NAMES)]
OTHER_NAMES = ["transport", "ob", "lr", "rinstance", "x-ast-orig-host", "user", "maddr", "x-pad"]

HEX64 = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)
FCM_TOKEN = st.builds(lambda a, b: f"{a}:APA91b{b}",
                      st.text(alphabet="abcXYZ019_-", min_size=5, max_size=12),
                      st.text(alphabet="abcXYZ019_-", min_size=14, max_size=150))
URLS = st.sampled_from([
    "http://db3.notify.live.net/throttledthirdparty/01.00/AQEVPwmdC_zuSZied",
    "https://push.example.com/v1/dev%3fid%3d42&k%3dv",
    "http://push.example.com:8080/zp/v1/abc123/def",
    "https://fcm.googleapis.com/fcm/send/cAbCdEf123:APA91bHxyz",
    "https://evil.example/x", "http://10.0.0.7:8080/p", "http://[::1]/x", "ftp://push.example.com/",
    "http://u:p@push.example.com/", "https%3A%2F%2Fpush.example.com%2Fx", "http://push.example.com/a%20b",
])
VALUES = st.one_of(
    st.none(),
    st.just(""),
    HEX64,
    st.builds(lambda a, b: f"{a}:voip&{b}:remote", HEX64, HEX64),
    FCM_TOKEN,
    URLS,
    st.sampled_from([
        "apns", "APNS", "apns.dev", "fcm", "webpush", "wp", "hms", "apple", "google", "firebase", "android",
        "ABCD1234.com.example.voip", "ABCD1234.org.linphone.phone.voip&remote", "T.com.x",
        "org.linphone.phone.voip.prod", "com.example.dev", "929724111839", "my-project-id",
        "1", "0", "IC_MSG", "%3A", "%zz", "%C3%28", "a%3Bb", "x=y", "[::1]", "Abc-123.x~y",
    ]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=";?<>\"@"),
            max_size=60),
)


def _case(name: str, how: int) -> str:
    return (name, name.upper(), name.title())[how]


OPTIONS = st.lists(st.tuples(st.sampled_from(sorted(OPTION_NAMES)),
                             st.sampled_from([None, "1", "0", "IC_MSG", "msg.caf", "a%20b", "%3C"])),
                   max_size=3, unique_by=lambda t: t[0])

# Coherent push parameter sets, one per dialect: most are valid, so acceptance is exercised too.
DIALECTS = st.one_of(
    st.builds(lambda tok, param, prov: [("pn-provider", prov), ("pn-prid", tok), ("pn-param", param)],
              st.one_of(HEX64, st.builds(lambda a, b: f"{a}:voip&{b}:remote", HEX64, HEX64)),
              st.sampled_from(["ABCD1234.com.example.voip", "ABCD1234.org.x.voip&remote", "T.com.x", "TEAM.a-b.c"]),
              st.sampled_from(["apns", "apns.dev", "APNS"])),
    st.builds(lambda tok, param: [("pn-provider", "fcm"), ("pn-prid", tok), ("pn-param", param)],
              FCM_TOKEN, st.sampled_from(["my-project-id", "929724111839", "example.com:proj"])),
    st.builds(lambda tok, app, kind: [("pn-type", kind), ("pn-tok", tok), ("app-id", app)],
              HEX64, st.sampled_from(["org.linphone.phone.voip.prod", "com.example.dev", "com.x"]),
              st.just("apple")),
    st.builds(lambda tok, kind: [("pn-type", kind), ("pn-tok", tok), ("app-id", "929724111839")],
              FCM_TOKEN, st.sampled_from(["google", "firebase", "android"])),
    st.builds(lambda url: [("x-push-uri", url)], URLS),
    st.builds(lambda tok: [("pn-provider", "webpush"), ("pn-prid", tok)],
              st.sampled_from(["https://fcm.googleapis.com/fcm/send/abc:APA91bX", "https://web.push.apple.com/Q",
                               "https://evil.example/x"])),
    st.builds(lambda tok: [("pn-provider", "wp"), ("pn-prid", tok)], st.sampled_from(["abc", "a/b+c=", "a%20b"])),
    st.just([]),
)


@st.composite
def contacts(draw: st.DrawFn) -> tuple[str, list[tuple[str, str | None]]]:
    scheme = draw(st.sampled_from(["sip"] * 5 + ["sips", "SIP", "tel", ""]))
    user = draw(st.sampled_from(["", "1001", "a%40b", "+331234;npdi", "909"]))
    host = draw(st.sampled_from(["127.0.0.1", "127.0.0.1:5060", "[::1]", "[::1]:5060", "example.com"] * 2 + ["h:0"]))
    params: list[tuple[str, str | None]] = list(draw(DIALECTS)) + list(draw(OPTIONS))
    if draw(st.booleans()):
        params.append((draw(st.sampled_from(OTHER_NAMES)), draw(st.sampled_from([None, "udp", "x"]))))
    if draw(st.integers(0, 3)) == 0 and params:  # mutate one value
        i = draw(st.integers(0, len(params) - 1))
        params[i] = (params[i][0], draw(VALUES))
    if draw(st.integers(0, 4)) == 0:  # add a random parameter, push-related or not
        params.append((draw(st.sampled_from(PUSH_NAMES + OTHER_NAMES)), draw(VALUES)))
    params = list(draw(st.permutations(params)))
    params = [(_case(n, draw(st.integers(0, 2))), v) for n, v in params]
    uri = f"{scheme}:" + (f"{user}@" if user else "") + host
    uri += "".join(f";{n}" if v is None else f";{n}={v}" for n, v in params)
    uri += draw(st.sampled_from(["", "", "?Subject=x", ";;"]))
    if draw(st.booleans()):
        uri = draw(st.sampled_from(["<{}>", "Contact: <{}>;expires=60", '"Name" <{}>'])).format(uri)
    return uri, params


def _allowed(host: str, entries: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == e or (e.startswith("*.") and host.endswith(e[1:]) and not host[-1].isdigit())
               for e in entries)


def check_accepted(push: PushParams, policy: ContactPolicy) -> None:
    """Independent restatement of the documented acceptance rules (docs/contacts.md)."""
    assert push.provider in {"apns", "fcm", "webpush", "vendor", *policy.extra_providers}
    assert push.token
    if push.provider == "apns":
        assert re.fullmatch(r"[0-9A-Fa-f]{64}", push.token)
        assert re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*", push.param)
        for service, token in push.extra_tokens:
            assert service == "remote" and re.fullmatch(r"[0-9A-Fa-f]{64}", token)
            assert push.param.endswith(".voip")
    else:
        assert push.extra_tokens == () and push.sandbox is False
    if push.provider == "fcm":
        assert re.fullmatch(r"[A-Za-z0-9_-]+(:[A-Za-z0-9_-]+)?", push.token) and 20 <= len(push.token) <= 400
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", push.param)
    if push.provider in ("vendor", "webpush"):
        assert re.fullmatch(r"[\x21-\x7e]+", push.token)
        parts = urlsplit(push.token)
        assert parts.scheme in (("http", "https") if push.provider == "vendor" else ("https",))
        assert "@" not in parts.netloc and parts.hostname
        hosts = policy.vendor_allowed_hosts if push.provider == "vendor" else policy.webpush_allowed_hosts
        assert _allowed(parts.hostname, hosts)
        assert push.param == ""
        assert push.dialect is (Dialect.ZOIPER if push.provider == "vendor" else Dialect.RFC8599)
    if push.provider not in ("apns", "fcm", "vendor", "webpush"):
        assert re.fullmatch(r"[A-Za-z0-9._~:+/=-]{1,256}", push.token)
    assert push.purr == "" or re.fullmatch(r"[A-Za-z0-9._~-]{1,128}", push.purr)
    names = [n for n, _ in push.options]
    assert names == sorted(names) and set(names) <= OPTION_NAMES
    assert all(re.fullmatch(r"[A-Za-z0-9 ._-]{0,64}", v) for _, v in push.options)


def check_rejected(exc: ContactRejected, secrets: list[str]) -> None:
    assert type(exc) is ContactRejected
    assert exc.reason in REASONS and exc.reason != "internal-error", str(exc)
    text = str(exc)
    assert text.startswith(exc.reason) and all(c.isprintable() for c in text)
    for secret in secrets:
        assert secret not in text


@FAST
@given(contact=contacts(), policy=st.sampled_from(POLICIES))
def test_structured_contacts(contact: tuple[str, list[tuple[str, str | None]]], policy: ContactPolicy) -> None:
    uri, params = contact
    push_params = [(n.lower(), v) for n, v in params if n.lower() in PUSH_NAMES]
    # Token-bearing values long enough that masking must hide them.
    secrets = [v for n, v in push_params if n in ("pn-prid", "pn-tok", "x-push-uri") and v and len(v) >= 12]
    try:
        push = parse_contact(uri, policy)
    except ContactRejected as exc:
        check_rejected(exc, secrets)
    else:
        if push is None:
            assert not push_params
        else:
            check_accepted(push, policy)


@FAST
@given(text=st.text(max_size=600), policy=st.sampled_from(POLICIES))
def test_arbitrary_text(text: str, policy: ContactPolicy) -> None:
    for candidate in (text, f"sip:a@h;{text}", f"sip:a@h;pn-provider=apns;pn-prid={text};pn-param=T.a.voip",
                      f"<sip:{text}>", f"sip:a@h;x-push-uri={text}"):
        try:
            push = parse_contact(candidate, policy)
        except ContactRejected as exc:
            check_rejected(exc, [])
        else:
            if push is not None:
                check_accepted(push, policy)


@FAST
@given(text=st.text(alphabet=st.sampled_from(";=:@<>[]%?&/. \tpnPN-0aF"), max_size=200))
def test_punctuation_soup(text: str) -> None:
    for candidate in (text, "sip:" + text, "sip:1@h;" + text):
        try:
            push = parse_contact(candidate, POLICIES[1])
        except ContactRejected as exc:
            check_rejected(exc, [])
        else:
            if push is not None:
                check_accepted(push, POLICIES[1])
        try:
            contact_parts(candidate)
        except ContactRejected as exc:
            assert exc.reason in {"bad-uri", "bad-escape", "too-long"}


@FAST
@given(data=st.binary(max_size=300))
def test_bytes_decoded_as_latin1(data: bytes) -> None:
    text = data.decode("latin-1")
    for candidate in (text, f"sip:a@h;pn-provider=fcm;pn-param=p;pn-prid={text}"):
        try:
            push = parse_contact(candidate, POLICIES[1])
        except ContactRejected as exc:
            check_rejected(exc, [])
        else:
            if push is not None:
                check_accepted(push, POLICIES[1])


def test_huge_and_odd_inputs() -> None:
    odd = [
        "sip:a@h;" + ";" * 1_000_000,
        "sip:a@h;pn-prid=" + "%41" * 300_000,
        "<" * 100_000,
        "\ud800sip:a@h",  # a lone surrogate
        "sip:a@h;pn-provider=apns;pn-prid=\U0001f4a9;pn-param=T.a.voip",
        "sip:a@[" + "1:" * 50_000 + "]",
        "sip:a@h:" + "9" * 5000,
        "\x00" * 1000,
        "sip:a@h;" + "pn-silent;" * 60,
    ]
    for text in odd:
        for policy in POLICIES:
            try:
                parse_contact(text, policy)
            except ContactRejected as exc:
                check_rejected(exc, [])
