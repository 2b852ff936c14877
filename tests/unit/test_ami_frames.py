"""AMI framing on recorded wire text (Asterisk 22.10, see shared notes)."""

from __future__ import annotations

import pytest

from ari_push.ami_frames import AmiParser, AmiProtocolError, encode_action

BANNER = b"Asterisk Call Manager/11.0.0\r\n"
CONTACT_STATUS = (
    b"Event: ContactStatus\r\nPrivilege: system,all\r\n"
    b"URI: sip:1001@127.0.0.1:5201;transport=udp;pn-provider=apns;"
    b"pn-prid=00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0;pn-param=ABCD1234.com.example.voip\r\n"
    b"ContactStatus: NonQualified\r\nAOR: 1001\r\nEndpointName: 1001\r\nRoundtripUsec: 0\r\n\r\n"
)


def test_banner_then_event_split_at_every_byte() -> None:
    wire = BANNER + CONTACT_STATUS
    for cut in range(1, len(wire)):
        p = AmiParser()
        msgs = p.feed(wire[:cut]) + p.feed(wire[cut:])
        assert len(msgs) == 1
        m = msgs[0]
        assert p.banner == "Asterisk Call Manager/11.0.0"
        assert m.event == "ContactStatus" and m.get("aor") == "1001" and m.get("contactstatus") == "NonQualified"
        assert m.get("URI").endswith("pn-param=ABCD1234.com.example.voip")


def test_several_messages_in_one_read_and_repeated_keys() -> None:
    p = AmiParser()
    msgs = p.feed(BANNER + b"Response: Success\r\nActionID: ap-1\r\nMessage: Authentication accepted\r\n\r\n"
                  b"Event: X\r\nChanVariable: A=1\r\nChanVariable: B=2\r\n\r\n")
    assert [m.response for m in msgs] == ["Success", ""]
    assert msgs[0].action_id == "ap-1"
    assert msgs[1].get_all("chanvariable") == ["A=1", "B=2"]


def test_not_an_ami_server_is_refused() -> None:
    with pytest.raises(AmiProtocolError, match="not an AMI server"):
        AmiParser().feed(b"HTTP/1.1 400 Bad Request\r\n")


def test_runaway_message_is_refused() -> None:
    p = AmiParser()
    p.feed(BANNER)
    with pytest.raises(AmiProtocolError, match="larger than 1 MiB"):
        p.feed(b"Event: X\r\nData: " + b"a" * (1 << 20) + b"\r\n")


def test_encode_refuses_line_injection() -> None:
    assert encode_action("Ping", "ap-1") == b"Action: Ping\r\nActionID: ap-1\r\n\r\n"
    with pytest.raises(ValueError, match="line break"):
        encode_action("DBGet", "ap-2", Family="SIP/Registry", Key="1001\r\nAction: Originate")
