"""Stasis(ari-push,<target>[,options]) argument parsing and contact ids."""

from __future__ import annotations

import pytest

from ari_push.calls import parse_args
from ari_push.channels import contact_object_id


def test_target_and_default_timeout() -> None:
    opts = parse_args(["1001"], 30, 120)
    assert (opts.target, opts.timeout) == ("1001", 30)


def test_timeout_option_in_one_or_several_args() -> None:
    assert parse_args(["1001", "timeout=25"], 30, 120).timeout == 25
    assert parse_args(["1001", "x=1,timeout=7.5"], 30, 120).timeout == 7.5


@pytest.mark.parametrize(
    ("args", "why"),
    [([], "missing target"), (["10 01"], "bad or missing"), (["1001;evil"], "bad or missing"),
     (["1001", "timeout=abc"], "not a number"), (["1001", "timeout=0"], "outside"),
     (["1001", "timeout=500"], "outside")],
)
def test_bad_arguments_are_refused_with_a_reason(args: list[str], why: str) -> None:
    with pytest.raises(ValueError, match=why.split()[0]):
        parse_args(args, 30, 120)


def test_contact_object_id_matches_asterisk() -> None:
    # measured on Asterisk 22.10 (shared notes, section 1.8)
    uri = "sip:1001@127.0.0.1:5401;transport=udp;pn-provider=apns;pn-prid=TOKA;pn-param=ABCD1234.com.example.voip"
    assert contact_object_id("1001", uri) == "1001;@84f144c75c7c3bd5d179f4e1f4508456"


def test_channel_age_from_asterisk_creationtime() -> None:
    import time
    from datetime import UTC, datetime, timedelta

    from ari_push.channels import channel_age

    ten_ago = (datetime.now(UTC) - timedelta(seconds=10)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"
    assert 9.5 < channel_age({"creationtime": ten_ago}) < 11
    assert channel_age({}) == 0.0
    assert channel_age({"creationtime": "garbage"}) == 0.0
    future = time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime(time.time() + 60))
    assert channel_age({"creationtime": future}) == 0.0
