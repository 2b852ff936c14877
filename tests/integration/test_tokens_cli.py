"""`ari-push tokens list|show|forget` on a real Redis; `inspect-contact` exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ari_push.bindings import RedisStore
from ari_push.contacts import ContactPolicy, parse_contact
from ari_push.model import Binding
from ari_push.redis_keys import Keys
from ari_push.service import make_redis
from ari_push.settings import RedisSettings
from rig.redis import RedisServer

TOKEN = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0"
URI = f"sip:1001@127.0.0.1:5201;transport=udp;pn-provider=apns;pn-prid={TOKEN};pn-param=ABCD1234.com.example.voip"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ari_push", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=30, check=False)


async def test_tokens_list_show_forget(tmp_path: Path, ensure_redis: RedisServer) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    config = tmp_path / "c.toml"
    config.write_text(f'[ari]\npassword="x"\n[ami]\nsecret="y"\n[redis]\nurl="{ensure_redis.url}"\n'
                      f'key_prefix="{prefix}"\n')
    client = make_redis(RedisSettings(url=ensure_redis.url))
    store = RedisStore(client, Keys(prefix), 86400)
    push = parse_contact(URI, ContactPolicy())
    assert push is not None
    now = time.time()
    await store.upsert(Binding("1001", "1001", push, URI, "Linphone/5", now, now))
    await client.aclose()

    listed = cli(config, "tokens", "list")
    assert listed.returncode == 0, listed.stderr
    assert "1001\t" in listed.stdout and push.device_id in listed.stdout
    assert TOKEN not in listed.stdout and "00fc…(64)" in listed.stdout and "e8f0" not in listed.stdout
    revealed = cli(config, "tokens", "list", "1001", "--reveal")
    assert TOKEN in revealed.stdout
    shown = json.loads(cli(config, "tokens", "show", "1001").stdout)
    assert shown[0]["push"]["provider"] == "apns" and shown[0]["user_agent"] == "Linphone/5"
    assert TOKEN not in json.dumps(shown)
    forgot = cli(config, "tokens", "forget", "1001", push.device_id)
    assert forgot.returncode == 0 and "forgot 1 device" in forgot.stdout
    assert cli(config, "tokens", "list").stdout.strip() == ""


def test_tokens_with_redis_down_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[ari]\npassword="x"\n[ami]\nsecret="y"\n[redis]\nurl="redis://127.0.0.1:1/0"\n'
                      'socket_timeout=0.5\n')
    result = cli(config, "tokens", "list")
    assert result.returncode == 1
    assert "store unavailable" in result.stderr


def test_inspect_contact_exit_codes(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[ari]\npassword="x"\n[ami]\nsecret="y"\n')
    ok = cli(config, "inspect-contact", URI)
    assert ok.returncode == 0 and json.loads(ok.stdout)["binding"]["push"]["param"] == "com.example.voip"
    assert TOKEN not in ok.stdout
    bad = cli(config, "inspect-contact", URI.replace(TOKEN, "Z" * 64))
    assert bad.returncode == 2 and json.loads(bad.stdout)["reason"] == "token-alphabet"
    desk = cli(config, "inspect-contact", "sip:2000@127.0.0.1:5060;transport=udp")
    assert desk.returncode == 2 and json.loads(desk.stdout)["reason"] == "no-push-parameters"
