"""ESL framing without sockets: byte streams as FreeSWITCH 1.10.12 sends them (captured on the rig)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ari_push.esl_frames import (
    MAX_MESSAGE_BYTES,
    EslParser,
    EslProtocolError,
    encode_command,
    parse_plain_event,
)
from ari_push.fs_capture import sofia_contact_uri, user_id

AUTH_REQUEST = b"Content-Type: auth/request\n\n"
ACCEPTED = b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n"
REFUSED = (b"Content-Type: command/reply\nReply-Text: -ERR invalid\n\n"
           b"Content-Type: text/disconnect-notice\nContent-Length: 67\n\n"
           b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n")
CONTACT = ('"" <sip:3000@127.0.0.1:53168;transport=udp;pn-provider=apns;'
           'pn-prid=00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0;pn-param=ABCD1234.com.example.voip>')


def _register_event() -> bytes:
    from urllib.parse import quote

    body = "".join(f"{k}: {quote(v, safe='')}\n" for k, v in [
        ("Event-Name", "CUSTOM"), ("Event-Subclass", "sofia::register"), ("profile-name", "internal"),
        ("contact", CONTACT), ("username", "3000"), ("realm", "127.0.0.1"), ("expires", "300"),
        ("user-agent", "ari-push-test-ua/1.0")]) + "\n"
    raw = body.encode()
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(raw) + raw


def test_handshake_and_api_reply() -> None:
    p = EslParser()
    [hello] = p.feed(AUTH_REQUEST)
    assert hello.content_type == "auth/request" and not hello.is_reply
    [ok] = p.feed(ACCEPTED)
    assert ok.is_reply and ok.ok and ok.reply_text == "+OK accepted"
    [api] = p.feed(b"Content-Type: api/response\nContent-Length: 2\n\n2\n")
    assert api.is_reply and api.ok and api.text == "2\n"
    [err] = p.feed(b"Content-Type: api/response\nContent-Length: 34\n\n-ERR bogus_cmd Command not found!\n")
    assert not err.ok


def test_refused_password_then_disconnect_notice_in_one_read() -> None:
    p = EslParser()
    p.feed(AUTH_REQUEST)
    reply, notice = p.feed(REFUSED)
    assert reply.is_reply and not reply.ok
    assert notice.content_type == "text/disconnect-notice" and notice.text.startswith("Disconnected")


def test_register_event_is_url_decoded() -> None:
    [msg] = EslParser().feed(_register_event())
    ev = msg.event()
    assert ev.name == "CUSTOM" and ev.subclass == "sofia::register"
    assert ev.get("CONTACT") == CONTACT  # look-ups ignore case; the value is decoded
    assert sofia_contact_uri(ev.get("contact")).startswith("sip:3000@127.0.0.1:53168;transport=udp;pn-provider=apns")


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_any_split_of_the_stream_gives_the_same_messages(cuts: list[int]) -> None:
    stream = AUTH_REQUEST + ACCEPTED + _register_event() + b"Content-Type: api/response\nContent-Length: 3\n\nab\n"
    whole = EslParser().feed(stream)
    p = EslParser()
    got = []
    pos = 0
    for n in cuts:
        got += p.feed(stream[pos:pos + n])
        pos += n
    got += p.feed(stream[pos:])
    assert got == whole and len(whole) == 4


def test_event_with_its_own_body() -> None:
    inner = b"Event-Name: BACKGROUND_JOB\nJob-UUID: 7f4d\nContent-Length: 8\n\n+OK 1234"
    ev = parse_plain_event(inner)
    assert ev.name == "BACKGROUND_JOB" and ev.body == "+OK 1234"


@pytest.mark.parametrize("stream, why", [
    (b"Content-Type: api/response\nContent-Length: x1\n\n", "bad Content-Length"),
    (b"Content-Type api/response\n\n", "without a colon"),
    (b"Content-Type: api/response\nContent-Length: %d\n\n" % (MAX_MESSAGE_BYTES + 1), "limit"),
    (b"X: " + b"a" * (70 << 10), "longer than 64 KiB"),
])
def test_broken_streams_are_refused_with_a_reason(stream: bytes, why: str) -> None:
    with pytest.raises(EslProtocolError, match=why):
        EslParser().feed(stream)


def test_not_a_plain_event() -> None:
    [msg] = EslParser().feed(b"Content-Type: api/response\nContent-Length: 1\n\nx")
    with pytest.raises(EslProtocolError, match="not a plain event"):
        msg.event()


def test_commands_cannot_inject_lines() -> None:
    assert encode_command("api uptime") == b"api uptime\n\n"
    assert encode_command("sendmsg 1234", (("call-command", "hangup"),)) == b"sendmsg 1234\ncall-command: hangup\n\n"
    with pytest.raises(ValueError, match="line break"):
        encode_command("api status\n\napi fsctl shutdown")
    with pytest.raises(ValueError, match="line break") as exc:
        encode_command("auth sec\nret")
    assert "sec" not in str(exc.value)  # the message never carries the command (auth has the password)
    with pytest.raises(ValueError, match="header x"):
        encode_command("sendmsg 1", (("x", "a\nb"),))


@pytest.mark.parametrize("contact, uri", [
    (CONTACT, CONTACT[4:-1]),
    ("<sip:3000@10.0.0.5:5060>;expires=300", "sip:3000@10.0.0.5:5060"),
    ('"Bob" <sips:bob@example.com;transport=tls>', "sips:bob@example.com;transport=tls"),
    ("sip:3000@10.0.0.5", "sip:3000@10.0.0.5"),
    ('"" <sip:3000@10.0.0.5', ""),
    ("", ""),
    ("nonsense text", ""),
])
def test_sofia_contact_uri(contact: str, uri: str) -> None:
    assert sofia_contact_uri(contact) == uri


def test_user_id() -> None:
    assert user_id("3000") == "3000"
    assert user_id("3000@a.example") == "3000"
    assert user_id(" 3000 ") == "3000"
    assert user_id("") == "" and user_id("@pbx.example.com") == ""
