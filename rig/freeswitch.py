"""FreeSWITCH instances run from the cached tree (rig/provision.py: ensure_freeswitch).

Every instance has its own directory (conf, log, run, db, temp ...) next to the shared tree, a
generated one-file ``freeswitch.xml`` (one sofia profile, the event socket on loopback with a
password, directory users with passwords, a dialplan that hands calls to ari-push) and its own
port block. It runs in the foreground (``-nf -nc``) as a child of the rig and is stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from rig.asterisk import TEST_AOR_COUNT, TEST_AOR_FIRST, rig_slot
from rig.process import PidInstance
from rig.provision import cache_dir, ensure_freeswitch

ESL_PASSWORD = "rig-esl-secret"
SIP_PASSWORD = "rig-sip-secret"  # every directory user's password (digest auth)
PROFILE = "internal"
DOMAIN = "127.0.0.1"
# Where the dialplan hands calls to ari-push: the caller dials a directory user.
PUSH_CONTEXT = "ari-push"
DIAL_STRING = ("{^^:sip_invite_domain=${dialed_domain}:presence_id=${dialed_user}@${dialed_domain}}"
               "${sofia_contact(*/${dialed_user}@${dialed_domain})}")


@dataclass(frozen=True)
class FsPorts:
    sip: int
    esl: int
    rtp_start: int
    rtp_end: int

    @classmethod
    def for_index(cls, index: int) -> FsPorts:
        """Instance i: SIP 63200+28i, ESL 63201+28i, RTP 63204+28i..63227+28i (24 ports: 6 calls
        with both legs on FreeSWITCH).

        ``ARI_PUSH_RIG_SLOT=s`` moves the index by 10*s, as for Asterisk (rig/asterisk.py Ports),
        so 80 indexes (slots 0-7) span 63200-65439: above the kernel's ephemeral range
        (32768-60999, so Redis and the fakes never take one) and above every Asterisk block
        (the highest, slots 6-7 RTP, ends at 63188)."""
        index += 10 * rig_slot()
        if not 0 <= index < 80:
            raise ValueError(f"FreeSWITCH instance index {index} is outside 0-79")
        base = 63200 + 28 * index
        return cls(sip=base, esl=base + 1, rtp_start=base + 4, rtp_end=base + 27)


def recipe_dialplan(relay_port: int = 0, prefix: str = "recipe-", sleep_ms: int = 2000, leg_timeout: int = 8) -> str:
    """The FreeSWITCH recipe ari-push replaces, as an extension for ``extra_dialplan``: ``<prefix><user>``
    rings the caller, pushes (``system`` running curl against a local relay's
    ``/recipe-push/<user>``; ``relay_port=0``: no push, the harness wakes the phone itself), sleeps
    ``sleep_ms``, then bridges to ``${sofia_contact(...)}``: whatever is registered by then."""
    push = (f'          <action application="system" data="curl -s -o /dev/null --max-time 2 '
            f'http://127.0.0.1:{relay_port}/recipe-push/${{recipe_target}}"/>\n') if relay_port else ""
    pattern = "".join("\\" + c if c in "*+.?" else c for c in prefix)
    return (f'      <extension name="recipe">\n'
            f'        <condition field="destination_number" expression="^{pattern}(\\d{{4}})$">\n'
            f'          <action application="set" data="recipe_target=$1"/>\n'
            f'          <action application="ring_ready"/>\n'
            f'{push}'
            f'          <action application="sleep" data="{sleep_ms}"/>\n'
            f'          <action application="bridge" data="{{leg_timeout={leg_timeout}}}'
            f'${{sofia_contact(${{recipe_target}}@$${{domain}})}}"/>\n'
            f'        </condition>\n'
            f'      </extension>\n')


class FreeswitchError(RuntimeError):
    pass


class FreeswitchInstance(PidInstance):
    """One FreeSWITCH process. ``users`` are the directory users (the test AOR block by default)."""

    def __init__(self, tree: Path, name: str, ports: FsPorts,
                 users: Sequence[int] = range(TEST_AOR_FIRST, TEST_AOR_FIRST + TEST_AOR_COUNT),
                 extra_dialplan: str = "", multiple_registrations: str = "contact") -> None:
        """``multiple_registrations``: the sofia profile parameter (``contact``: one registration per
        contact URI; ``true``: per Call-ID; ``false``: one per user)."""
        self.tree = tree
        self.multiple_registrations = multiple_registrations
        self.name = name if rig_slot() == 0 else f"{name}-s{rig_slot()}"
        self.ports = ports
        self.users = users
        self.extra_dialplan = extra_dialplan
        self.home = cache_dir() / "freeswitch-run" / self.name
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def provisioned(cls, name: str, ports: FsPorts, **kwargs: object) -> FreeswitchInstance:
        return cls(ensure_freeswitch(), name, ports, **kwargs)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- paths

    @property
    def conf_dir(self) -> Path:
        return self.home / "conf"

    @property
    def console_log(self) -> Path:
        return self.home / "log" / "console.log"

    @property
    def log_file(self) -> Path:
        return self.home / "log" / "freeswitch.log"

    def _env(self) -> dict[str, str] | None:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = str(self.tree / "lib")
        return env

    # ---------------------------------------------------------------- config

    def write_config(self) -> None:
        """A fresh home: config, and empty db/log/run (no registrations left from an earlier run).
        Refused while the instance's ports are taken: another session may be running it."""
        self._check_ports_free()
        if self.home.exists():
            shutil.rmtree(self.home)
        for d in ("conf", "log", "run", "db", "temp", "recordings", "storage", "cache", "certs", "scripts",
                  "sounds"):
            (self.home / d).mkdir(parents=True)
        (self.conf_dir / "freeswitch.xml").write_text(self.freeswitch_xml())

    def freeswitch_xml(self) -> str:
        p = self.ports
        users = "\n".join(
            f'        <user id="{u}"><params><param name="password" value={quoteattr(SIP_PASSWORD)}/></params>'
            f'<variables><variable name="user_context" value="{PUSH_CONTEXT}"/></variables></user>'
            for u in self.users
        )
        return f"""<?xml version="1.0"?>
<document type="freeswitch/xml">
  <X-PRE-PROCESS cmd="set" data="domain={DOMAIN}"/>
  <section name="configuration" description="rig {self.name}">
    <configuration name="switch.conf" description="Core">
      <settings>
        <param name="colorize-console" value="false"/>
        <param name="loglevel" value="info"/>
        <param name="max-sessions" value="200"/>
        <param name="sessions-per-second" value="100"/>
        <param name="rtp-start-port" value="{p.rtp_start}"/>
        <param name="rtp-end-port" value="{p.rtp_end}"/>
        <param name="core-db-name" value="core.db"/>
        <param name="dump-cores" value="no"/>
      </settings>
    </configuration>
    <configuration name="modules.conf" description="Modules">
      <modules>
        <load module="mod_console"/>
        <load module="mod_logfile"/>
        <load module="mod_event_socket"/>
        <load module="mod_sofia"/>
        <load module="mod_loopback"/>
        <load module="mod_commands"/>
        <load module="mod_dptools"/>
        <load module="mod_dialplan_xml"/>
        <load module="mod_sndfile"/>
        <load module="mod_tone_stream"/>
      </modules>
    </configuration>
    <configuration name="console.conf" description="Console">
      <mappings><map name="all" value="console,debug,info,notice,warning,err,crit,alert"/></mappings>
      <settings><param name="colorize" value="false"/><param name="loglevel" value="info"/></settings>
    </configuration>
    <configuration name="logfile.conf" description="Log file">
      <settings><param name="rotate-on-hup" value="true"/></settings>
      <profiles><profile name="default"><settings><param name="rollover" value="10485760"/></settings>
        <mappings><map name="all" value="info,notice,warning,err,crit,alert"/></mappings></profile></profiles>
    </configuration>
    <configuration name="event_socket.conf" description="Event socket">
      <settings>
        <param name="nat-map" value="false"/>
        <param name="listen-ip" value="127.0.0.1"/>
        <param name="listen-port" value="{p.esl}"/>
        <param name="password" value={quoteattr(ESL_PASSWORD)}/>
        <param name="apply-inbound-acl" value="loopback.auto"/>
      </settings>
    </configuration>
    <configuration name="sofia.conf" description="SIP">
      <global_settings>
        <param name="log-level" value="0"/>
        <param name="auto-restart" value="false"/>
      </global_settings>
      <profiles>
        <profile name="{PROFILE}">
          <aliases/>
          <gateways/>
          <domains><domain name="all" alias="true" parse="false"/></domains>
          <settings>
            <param name="sip-ip" value="127.0.0.1"/>
            <param name="rtp-ip" value="127.0.0.1"/>
            <param name="ext-sip-ip" value="127.0.0.1"/>
            <param name="ext-rtp-ip" value="127.0.0.1"/>
            <param name="sip-port" value="{p.sip}"/>
            <param name="context" value="{PUSH_CONTEXT}"/>
            <param name="dialplan" value="XML"/>
            <param name="auth-calls" value="true"/>
            <param name="apply-nat-acl" value="none"/>
            <param name="local-network-acl" value="localnet.auto"/>
            <param name="inbound-codec-prefs" value="PCMU,PCMA"/>
            <param name="outbound-codec-prefs" value="PCMU,PCMA"/>
            <param name="manage-presence" value="false"/>
            <param name="force-register-domain" value="$${{domain}}"/>
            <param name="force-register-db-domain" value="$${{domain}}"/>
            <param name="challenge-realm" value="auto_from"/>
            <param name="multiple-registrations" value="{self.multiple_registrations}"/>
            <param name="accept-blind-reg" value="false"/>
            <param name="nonce-ttl" value="60"/>
            <param name="minimum-session-expires" value="90"/>
            <param name="user-agent-string" value="FreeSWITCH-rig"/>
            <param name="rtp-timer-name" value="soft"/>
          </settings>
        </profile>
      </profiles>
    </configuration>
  </section>
  <section name="dialplan" description="XML dialplan">
    <context name="{PUSH_CONTEXT}">
      <!-- a call to a directory user is handed to ari-push: ring the caller and park the
           channel; ari-push (inbound event socket) takes it over by UUID. -->
      <extension name="push_user">
        <condition field="destination_number" expression="^(\\d{{4}})$">
          <action application="set" data="push_target=$1"/>
          <action application="set" data="ari_push=1"/>
          <action application="set" data="park_timeout=150:RECOVERY_ON_TIMER_EXPIRE"/>
          <action application="ring_ready"/>
          <action application="park"/>
        </condition>
      </extension>
      <extension name="push_done">
        <condition field="destination_number" expression="^push-done$">
          <action application="log" data="NOTICE push_status=${{push_status}} target=${{push_target}}"/>
          <action application="hangup" data="NORMAL_CLEARING"/>
        </condition>
      </extension>
      <extension name="echo">
        <condition field="destination_number" expression="^9196$">
          <action application="answer"/>
          <action application="echo"/>
        </condition>
      </extension>
{self.extra_dialplan}
    </context>
  </section>
  <section name="directory" description="Users">
    <domain name="$${{domain}}">
      <params>
        <param name="dial-string" value="{DIAL_STRING}"/>
      </params>
      <groups><group name="default"><users>
{users}
      </users></group></groups>
    </domain>
  </section>
</document>
"""

    # ---------------------------------------------------------------- lifecycle

    kind = "freeswitch"
    error = FreeswitchError

    def _ports(self) -> list[tuple[int, int]]:
        return [(self.ports.esl, socket.SOCK_STREAM), (self.ports.sip, socket.SOCK_DGRAM),
                (self.ports.sip, socket.SOCK_STREAM)]

    def _command(self) -> list[str]:
        h = self.home
        # -np: normal priority. Run as root on more than one core FreeSWITCH makes itself a
        # realtime (SCHED_FIFO) process by default, which starves everything else on a 2-core test box.
        return [str(self.tree / "bin" / "freeswitch"), "-nf", "-nc", "-np", "-nonat", "-nonatmap", "-nocal",
                "-base", str(self.tree), "-conf", str(h / "conf"), "-log", str(h / "log"), "-run", str(h / "run"),
                "-db", str(h / "db"), "-mod", str(self.tree / "mod"), "-temp", str(h / "temp"),
                "-sounds", str(h / "sounds"), "-recordings", str(h / "recordings"), "-storage", str(h / "storage"),
                "-cache", str(h / "cache"), "-certs", str(h / "certs"), "-scripts", str(h / "scripts")]

    def _ready(self) -> bool:
        try:
            return "is ready" in self.api("status", timeout=2) and PROFILE in self.api("sofia status", timeout=2)
        except (OSError, FreeswitchError):
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM by PID (FreeSWITCH shuts down in about 5 s), SIGKILL of its group as the last resort."""
        super().stop(timeout)

    # ---------------------------------------------------------------- control

    def api(self, command: str, timeout: float = 5.0) -> str:
        """One ESL ``api`` command on a fresh connection (blocking; the rig's own control path)."""
        with socket.create_connection(("127.0.0.1", self.ports.esl), timeout=timeout) as s:
            f = s.makefile("rb")

            def read_msg() -> tuple[dict[str, str], bytes]:
                headers: dict[str, str] = {}
                while True:
                    line = f.readline()
                    if not line:
                        raise FreeswitchError("event socket closed")
                    line = line.rstrip(b"\n")
                    if not line:
                        if headers:
                            break
                        continue
                    k, _, v = line.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = f.read(int(headers["content-length"])) if "content-length" in headers else b""
                return headers, body

            hello, _ = read_msg()
            if hello.get("content-type") != "auth/request":
                raise FreeswitchError(f"not an event socket: {hello}")
            s.sendall(f"auth {ESL_PASSWORD}\n\n".encode())
            reply, _ = read_msg()
            if not reply.get("reply-text", "").startswith("+OK"):
                raise FreeswitchError(f"event socket refused the password: {reply.get('reply-text')}")
            s.sendall(f"api {command}\n\n".encode())
            while True:
                headers, body = read_msg()
                if headers.get("content-type") == "api/response":
                    return body.decode(errors="replace")

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def daemon_config(self, redis_url: str = "") -> str:
        """An ari-push TOML pointing at this instance."""
        lines = [
            "[freeswitch]",
            f"port = {self.ports.esl}",
            f'password = "{ESL_PASSWORD}"',
            f'profile = "{PROFILE}"',
        ]
        if redis_url:
            lines += ["[redis]", f'url = "{redis_url}"']
        return "\n".join(lines) + "\n"
