"""[log] format: "json" writes one JSON object per line; "human" a plain line. Both to stdout."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from ari_push.logs import configure


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_format_is_one_object_per_line(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO", "json")
    log = logging.getLogger("ari_push.test")
    log.info("call %s: ringing", "c-1")
    log.debug("not at INFO")
    try:
        raise ValueError("boom \"quoted\"\nsecond line")
    except ValueError:
        log.exception("failed")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # the exception's traceback stays inside its line
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "call c-1: ringing" and first["level"] == "info" and first["logger"] == "ari_push.test"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]


def test_human_format_and_quiet_http_loggers(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure("DEBUG", "human")
    logging.getLogger("ari_push.test").debug("hello")
    logging.getLogger("httpx").info("HTTP Request: POST https://example/")  # per-request noise: off
    out = capsys.readouterr().out
    assert "DEBUG   ari_push.test: hello" in out and "HTTP Request" not in out
    with pytest.raises(ValueError):
        json.loads(out.splitlines()[0])
