"""Real redis-server / redis-sentinel processes (Debian's) on free loopback ports, each in its
own directory: a standalone server (optionally with AUTH, TLS, or as a replica) and a Sentinel
set-up (master + replicas + sentinels) that fault tests can fail over or kill.

Stdlib only (see rig/__init__.py): admin commands go through the small RESP client below.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rig.process import terminate


class RedisError(RuntimeError):
    pass


class RespError(RedisError):
    """An error reply (``-ERR ...``) from a server."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- a minimal RESP2 client


@dataclass(frozen=True)
class TlsFiles:
    """TLS for a server: its certificate and key, the CA that signs client certificates, and
    whether clients must show one (``tls-auth-clients``: yes, no or optional). ``client_file``
    (PEM cert + key) is what the rig itself presents when ``auth_clients`` is not ``no``."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    auth_clients: str = "yes"
    client_file: Path | None = None

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if self.client_file is not None:
            ctx.load_cert_chain(str(self.client_file))
        return ctx


def _encode(args: Sequence[str | int | bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RedisError("connection closed by the server")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RedisError("connection closed by the server")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RedisError(f"unexpected reply {line[:40]!r}")


def command(port: int, *args: str | int | bytes, password: str = "", tls: TlsFiles | None = None,
            timeout: float = 2.0) -> object:
    """Send one command (after AUTH when ``password``) and return its decoded reply."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock = tls.client_context().wrap_socket(raw, server_hostname="127.0.0.1") if tls is not None else raw
    with sock:
        reader = _Reader(sock)
        if password:
            sock.sendall(_encode(["AUTH", password]))
            reader.reply()
        sock.sendall(_encode(args))
        return reader.reply()


def info(port: int, section: str, password: str = "", tls: TlsFiles | None = None) -> dict[str, str]:
    text = command(port, "INFO", section, password=password, tls=tls)
    assert isinstance(text, str)
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            out[key] = value
    return out


# ---------------------------------------------------------------- one server


class RedisServer:
    """One redis-server. Defaults (AOF on, no RDB snapshots, plain TCP, no password) are what
    the integration tests have always used; the keyword arguments add the rest."""

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        appendonly: bool = True,
        *,
        password: str = "",
        tls: TlsFiles | None = None,
        replica_of: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="ari-push-redis-"))
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self.replica_of = replica_of
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Without the password: pass it as ``[redis] password``."""
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        args = ["--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--appendonly", "yes" if self.appendonly else "no", "--save", "", "--daemonize", "no",
                "--protected-mode", "yes", "--repl-diskless-sync-delay", "0"]
        if self.tls is not None:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert_file),
                     "--tls-key-file", str(self.tls.key_file), "--tls-ca-cert-file", str(self.tls.ca_file),
                     "--tls-auth-clients", self.tls.auth_clients]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        return args + self.extra_args

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisError("redis-server is not installed (apt-get install redis-server)")
        self._spawn([exe, *self.args()], "redis.log", timeout)

    def _spawn(self, argv: list[str], logname: str, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / logname, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RedisError(f"{argv[0]} exited with {self.proc.returncode}; see {self.workdir}/{logname}")
            if self.ping():
                return
            time.sleep(0.05)
        raise RedisError(f"{argv[0]} on port {self.port} not ready within {timeout}s")

    def command(self, *args: str | int | bytes) -> object:
        return command(self.port, *args, password=self.password, tls=self.tls)

    def ping(self) -> bool:
        try:
            return self.command("PING") == "PONG"
        except (OSError, RedisError):
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        terminate(self.proc, 10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown work (no final AOF rewrite, no goodbye to replicas)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class SentinelProcess(RedisServer):
    """One redis-sentinel watching one master (its config file is rewritten by Sentinel)."""

    def __init__(self, workdir: Path, service: str, master_port: int, quorum: int, *, password: str = "",
                 down_after_ms: int = 1000, failover_timeout_ms: int = 4000) -> None:
        super().__init__(workdir=workdir, appendonly=False)
        self.service = service
        lines = [
            f"port {self.port}", "bind 127.0.0.1", f"dir {workdir}", "daemonize no",
            f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {failover_timeout_ms}",
            f"sentinel parallel-syncs {service} 1",
        ]
        if password:
            lines.append(f"sentinel auth-pass {service} {password}")
        self.conf = workdir / "sentinel.conf"
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-sentinel")
        if exe is None:
            raise RedisError("redis-sentinel is not installed (apt-get install redis-sentinel)")
        self._spawn([exe, str(self.conf)], "sentinel.log", timeout)

    def master(self) -> dict[str, str]:
        reply = self.command("SENTINEL", "MASTER", self.service)
        assert isinstance(reply, list)
        return dict(zip(reply[::2], reply[1::2], strict=True))

    def master_port(self) -> int:
        reply = self.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        assert isinstance(reply, list)
        return int(reply[1])


class SentinelSet:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a majority), every
    one on a free loopback port under one temp directory. ``down_after_ms`` is how long a
    silent master takes to be declared down (Sentinel's default is 30 s; tests want ~1 s)."""

    def __init__(self, service: str = "mymaster", *, replicas: int = 1, sentinels: int = 3, password: str = "",
                 down_after_ms: int = 1000, failover_timeout_ms: int = 4000, workdir: Path | None = None) -> None:
        self.service = service
        self.password = password
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="ari-push-sentinel-"))
        self.servers = [RedisServer(workdir=self.workdir / "r0", appendonly=False, password=password)]
        for i in range(replicas):
            self.servers.append(RedisServer(workdir=self.workdir / f"r{i + 1}", appendonly=False, password=password,
                                            replica_of=self.servers[0].port))
        quorum = sentinels // 2 + 1
        self.sentinels = [
            SentinelProcess(self.workdir / f"s{i}", service, self.servers[0].port, quorum, password=password,
                            down_after_ms=down_after_ms, failover_timeout_ms=failover_timeout_ms)
            for i in range(sentinels)
        ]

    @property
    def addresses(self) -> list[str]:
        """The sentinels as ``host:port``: what ``[redis] sentinels`` takes."""
        return [s.address for s in self.sentinels]

    def start(self, timeout: float = 20.0) -> None:
        """Start everything; return once every sentinel knows every replica and every other sentinel
        (until then a fail-over could find no replica to promote, or no majority)."""
        for server in self.servers:
            server.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        replicas, others = len(self.servers) - 1, len(self.sentinels) - 1
        state: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                states = [s.master() for s in self.sentinels if s.running]
                if states and all(
                    int(st["num-slaves"]) >= replicas and int(st["num-other-sentinels"]) >= others
                    and st["flags"] == "master" for st in states
                ) and self._replicas_linked():
                    return
                state = states[0] if states else {}
            except (OSError, RedisError):
                pass
            time.sleep(0.1)
        raise RedisError(f"sentinel set not healthy within {timeout}s: {state}")

    def _replicas_linked(self) -> bool:
        master = self.master()
        for server in self.servers:
            if server is master or not server.running:
                continue
            if info(server.port, "replication", self.password).get("master_link_status") != "up":
                return False
        return True

    def master_port(self) -> int:
        """The master as the sentinels see it (first sentinel that answers)."""
        for sentinel in self.sentinels:
            if sentinel.running:
                try:
                    return sentinel.master_port()
                except (OSError, RedisError):
                    continue
        raise RedisError("no sentinel answers")

    def master(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    def failover(self) -> int:
        """``SENTINEL FAILOVER``: promote a replica now, without asking the other sentinels.
        Returns the old master's port."""
        old = self.master_port()
        self.sentinels[0].command("SENTINEL", "FAILOVER", self.service)
        return old

    def wait_new_master(self, old_port: int, timeout: float = 15.0) -> int:
        """Until every running sentinel names a master other than ``old_port`` and that server
        says it is a master; returns its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ports = {s.master_port() for s in self.sentinels if s.running}
                if len(ports) == 1 and old_port not in ports:
                    port = ports.pop()
                    if info(port, "replication", self.password).get("role") == "master":
                        return port
            except (OSError, RedisError):
                pass
            time.sleep(0.05)
        raise RedisError(f"no new master within {timeout}s")

    def stop(self) -> None:
        for proc in [*self.sentinels, *self.servers]:
            proc.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
