"""[redis] settings: credentials moved out of the URL, unix sockets, Sentinel addresses, TLS
keys; and what make_redis builds from them (no connection is made here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ari_push.redis_client import FollowMasterPool, SentinelRedis
from ari_push.service import make_redis
from ari_push.settings import RedisSettings, SettingsError, load, to_display

BASE = "[ari]\npassword='x'\n[ami]\nsecret='y'\n[redis]\n"


def redis_settings(tmp_path: Path, text: str) -> RedisSettings:
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE + text)
    return load(cfg, environ={}).redis


def test_password_in_the_url_moves_out_of_it(tmp_path: Path) -> None:
    s = redis_settings(tmp_path, "url = 'redis://app:p%40ss-w0rd@10.0.0.5:6380/2'\n")
    assert s.url == "redis://10.0.0.5:6380/2"
    assert s.username == "app" and s.password == "p@ss-w0rd"
    assert "p@ss-w0rd" not in json.dumps(to_display(s)) and "p%40ss" not in json.dumps(to_display(s))
    only_pw = redis_settings(tmp_path, "url = 'rediss://:secret-pw@redis.example:6380/0'\n")
    assert only_pw.url == "rediss://redis.example:6380/0" and only_pw.password == "secret-pw" and only_pw.tls


def test_unix_socket_url_is_accepted(tmp_path: Path) -> None:
    s = redis_settings(tmp_path, "url = 'unix:///run/redis/redis-server.sock?db=1'\n")
    assert s.url == "unix:///run/redis/redis-server.sock?db=1" and not s.embedded


def test_sentinel_settings(tmp_path: Path) -> None:
    (tmp_path / "sentinel.secret").write_text("sentinel-pw\n")
    s = redis_settings(tmp_path, "sentinels = ['10.0.0.1:26379', '[fd00::2]:26379']\nsentinel_service = 'pbx'\n"
                                 "password = 'pw'\nsentinel_password_file = 'sentinel.secret'\n")
    assert s.sentinels == ("10.0.0.1:26379", "[fd00::2]:26379") and s.sentinel_password == "sentinel-pw"
    assert not s.embedded
    client = make_redis(s)
    assert isinstance(client, SentinelRedis) and isinstance(client.connection_pool, FollowMasterPool)
    hosts = [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
             for c in client.connection_pool.sentinel_manager.sentinels]
    assert hosts == [("10.0.0.1", 26379), ("fd00::2", 26379)]
    assert client.connection_pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs[
        "password"] == "sentinel-pw"


@pytest.mark.parametrize(("text", "key", "why"), [
    ("sentinels = ['10.0.0.1']\n", "redis.sentinels", "HOST:PORT"),
    ("sentinels = ['10.0.0.1:99999']\n", "redis.sentinels", "HOST:PORT"),
    ("url = 'redis://127.0.0.1:6379'\nsentinels = ['10.0.0.1:26379']\n", "redis.sentinels", "not both"),
    ("url = 'redis://:a@127.0.0.1:6379'\npassword = 'b'\n", "redis.password", "give it once"),
    ("url = 'redis://127.0.0.1:6379'\ntls = true\n", "redis.tls", "rediss://"),
    ("url = 'rediss://127.0.0.1:6379'\ntls = false\n", "redis.tls", "always uses TLS"),
    ("url = 'redis://127.0.0.1:6379'\ntls_ca_file = 'ca.pem'\n", "redis.tls_ca_file", "only used with TLS"),
    ("url = 'rediss://127.0.0.1:6379'\ntls_key_file = 'ca.pem'\n", "redis.tls_key_file", "without a client"),
    ("url = 'rediss://127.0.0.1:6379'\ntls_cert_file = 'ca.pem'\n", "redis.tls_key_file", "needs its key"),
    ("url = 'unix://'\n", "redis.url", "socket path"),
    ("url = 'http://u:hidden@127.0.0.1:6379'\n", "redis.url", "redis/rediss/unix URL"),
])
def test_bad_redis_settings_name_the_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    with pytest.raises(SettingsError) as err:
        redis_settings(tmp_path, text)
    assert err.value.key == key and why in err.value.why
    assert "hidden" not in str(err.value)


def test_tls_keys_reach_the_connection(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"
                                     "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n")
    s = redis_settings(tmp_path, "url = 'rediss://127.0.0.1:6390/0'\ntls_ca_file = 'ca.pem'\n"
                                 "tls_cert_file = 'client.pem'\n")
    kwargs = make_redis(s).connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(tmp_path / "ca.pem") and kwargs["ssl_certfile"] == str(tmp_path / "client.pem")
    sentinel = redis_settings(tmp_path, "sentinels = ['127.0.0.1:26379']\ntls = true\ntls_ca_file = 'ca.pem'\n")
    client = make_redis(sentinel)
    assert client.connection_pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    assert client.connection_pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs[
        "ssl_ca_certs"] == str(tmp_path / "ca.pem")
