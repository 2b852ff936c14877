"""Asterisk instances in the cached Debian sid root.

Several instances share one root file system; each has its own config, run, log, spool and
astdb directories (`asterisk -C /etc/asterisk-<name>/asterisk.conf`) and its own ports.
The project's `asterisk-conf/` is copied in with the ports rewritten; the rig adds the
files an instance needs to run (asterisk.conf, modules.conf, logger.conf, rtp.conf) and
`pjsip_local.conf` with the test endpoints.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rig.process import PidInstance
from rig.provision import mount_proc

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CONF = REPO / "asterisk-conf"

ARI_USER = "ari-push"
ARI_PASSWORD = "rig-ari-secret"
AMI_USER = "ari-push"
AMI_SECRET = "rig-ami-secret"
# Test endpoints written into pjsip_local.conf: push AORs a test can take for itself.
TEST_AOR_FIRST = 3000
TEST_AOR_COUNT = 200
QUALIFY_AOR_FIRST = 3900  # push AORs with qualify_frequency=2 (tests/integration/test_qualify.py)
QUALIFY_AOR_COUNT = 4

MODULES_CONF = """\
[modules]
autoload=yes
; not needed by the rig; skipping them makes start-up quicker and the log quieter
noload => chan_iax2.so
noload => chan_dahdi.so
noload => chan_mgcp.so
noload => chan_skinny.so
noload => chan_unistim.so
noload => chan_motif.so
noload => chan_ooh323.so
noload => chan_console.so
noload => chan_alsa.so
noload => chan_oss.so
noload => res_xmpp.so
noload => res_hep.so
noload => res_hep_pjsip.so
noload => res_hep_rtcp.so
noload => res_config_ldap.so
noload => res_config_pgsql.so
noload => res_config_odbc.so
noload => res_config_sqlite3.so
noload => res_odbc.so
noload => res_snmp.so
noload => res_calendar.so
noload => res_calendar_caldav.so
noload => res_calendar_ews.so
noload => res_calendar_exchange.so
noload => res_calendar_icalendar.so
noload => res_corosync.so
noload => res_fax.so
noload => res_fax_spandsp.so
noload => res_phoneprov.so
noload => res_pjsip_phoneprov_provider.so
noload => res_smdi.so
noload => res_stun_monitor.so
noload => res_prometheus.so
noload => cdr_pgsql.so
noload => cdr_radius.so
noload => cdr_tds.so
noload => cdr_odbc.so
noload => cdr_sqlite3_custom.so
noload => cel_pgsql.so
noload => cel_radius.so
noload => cel_tds.so
noload => cel_odbc.so
noload => cel_sqlite3_custom.so
noload => app_voicemail.so
noload => app_voicemail_imap.so
noload => app_voicemail_odbc.so
noload => app_minivm.so
noload => app_meetme.so
noload => app_confbridge.so
noload => app_festival.so
noload => app_jack.so
noload => pbx_dundi.so
noload => pbx_lua.so
noload => pbx_ael.so
noload => res_ael_share.so
noload => pbx_realtime.so
noload => res_pjsip_outbound_registration.so
noload => res_pjsip_outbound_publish.so
noload => res_pjsip_publish_asterisk.so
"""

LOGGER_CONF = """\
[general]
[logfiles]
messages.log => notice,warning,error,verbose(3)
"""


@dataclass(frozen=True)
class Ports:
    sip: int
    http: int
    ami: int
    rtp_start: int
    rtp_end: int

    @classmethod
    def for_index(cls, index: int) -> Ports:
        """Instance i: SIP 15060+100i, HTTP 15088+100i, AMI 15038+100i, RTP 20000+1000i..+998.

        ``ARI_PUSH_RIG_SLOT=s`` (0-7, default 0) moves every index by 10*s, so that up to eight
        test sessions (several checkouts on one machine) never share a port or an instance.
        Indexes from 40 on (slots 4 and 5) would leave the port range, so they get SIP, HTTP and
        AMI at 14000+20(i-40)+{0,1,2} and 199 RTP ports at 10000+200(i-40), below every other block;
        from 60 on (slots 6 and 7) 99 RTP ports at 61000+110(i-60)."""
        index += 10 * rig_slot()
        if index >= 60:  # slots 6 and 7: RTP above the kernel's ephemeral ports (32768-60999)
            base, low = 14000 + 20 * (index - 40), 61000 + 110 * (index - 60)
            return cls(sip=base, http=base + 1, ami=base + 2, rtp_start=low, rtp_end=low + 98)
        if index >= 40:
            base, low = 14000 + 20 * (index - 40), 10000 + 200 * (index - 40)
            return cls(sip=base, http=base + 1, ami=base + 2, rtp_start=low, rtp_end=low + 198)
        return cls(
            sip=15060 + 100 * index,
            http=15088 + 100 * index,
            ami=15038 + 100 * index,
            rtp_start=20000 + 1000 * index,
            rtp_end=20998 + 1000 * index,
        )


def rig_slot() -> int:
    raw = os.environ.get("ARI_PUSH_RIG_SLOT", "0") or "0"
    if not raw.isdigit() or int(raw) > 7:
        raise ValueError(f"ARI_PUSH_RIG_SLOT must be 0 to 7, got {raw!r}")
    return int(raw)


def moh_tone(directory: Path) -> None:
    """Music for the ``default`` class: one second of a 440 Hz tone (8 kHz signed linear). It
    must be there when Asterisk starts: with no file, Asterisk 22 disables music on hold, and
    neither ``moh reload`` nor a reload of the module brings it back (measured)."""
    path = directory / "ari-push-test-tone.sln"
    if path.exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    tone = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / 8000))) for i in range(8000))
    path.write_bytes(tone * 2)


class AsteriskError(RuntimeError):
    pass


class AsteriskInstance(PidInstance):
    """One Asterisk process in the shared root, controlled through its CLI socket."""

    def __init__(self, root: Path, name: str, ports: Ports, app_names: tuple[str, ...] = ("ari-push",),
                 extra_dialplan: str = "", extra_pjsip: str = "",
                 rtp_ports: tuple[int, int] | None = None, extra_conf: dict[str, str] | None = None,
                 verbose: int = 3) -> None:
        """``extra_dialplan`` is appended to extensions.conf and ``extra_pjsip`` to pjsip_local.conf
        (the demo and the benchmark add their contexts and AORs there); ``rtp_ports`` widens the
        RTP range beyond the instance's 999 ports (the capacity benchmark needs thousands);
        ``extra_conf`` maps a file name to text appended to that file (created when the sample
        has none), e.g. the ARI outbound websocket of asterisk-conf/outbound/; ``verbose`` is
        Asterisk's verbosity (the -v count and messages.log's verbose level; 0: no verbose lines
        at all, for the benchmark's runs of a PBX that logs little)."""
        self.root = root
        self.name = name if rig_slot() == 0 else f"{name}-s{rig_slot()}"
        self.ports = ports
        self.app_names = app_names
        self.extra_dialplan = extra_dialplan
        self.extra_pjsip = extra_pjsip
        self.rtp_ports = rtp_ports or (ports.rtp_start, ports.rtp_end)
        self.extra_conf = dict(extra_conf or {})
        self.verbose = verbose
        self.etc = f"/etc/asterisk-{self.name}"
        self.proc: subprocess.Popen[bytes] | None = None

    # ---------------------------------------------------------------- paths

    def host_path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    @property
    def conf(self) -> str:
        return f"{self.etc}/asterisk.conf"

    @property
    def console_log(self) -> Path:
        return self.host_path(f"/var/log/asterisk-{self.name}/console.log")

    @property
    def ari_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    # ---------------------------------------------------------------- config

    def write_config(self) -> None:
        etc = self.host_path(self.etc)
        if etc.exists():
            shutil.rmtree(etc)
        etc.mkdir(parents=True)
        for d in ("run", "log", "spool", "lib"):
            base = {"run": "/var/run", "log": "/var/log", "spool": "/var/spool", "lib": "/var/lib"}[d]
            path = self.host_path(f"{base}/asterisk-{self.name}")
            if d in ("run", "spool", "lib") and path.exists():
                shutil.rmtree(path)  # fresh astdb: no contacts left from an earlier run
            path.mkdir(parents=True, exist_ok=True)
        for src in SAMPLE_CONF.glob("*.conf"):
            (etc / src.name).write_text(self._patch(src.name, src.read_text()))
        (etc / "asterisk.conf").write_text(self._asterisk_conf())
        (etc / "modules.conf").write_text(MODULES_CONF)
        logger = LOGGER_CONF if self.verbose else LOGGER_CONF.replace(",verbose(3)", "")
        (etc / "logger.conf").write_text(logger.replace("verbose(3)", f"verbose({self.verbose})"))
        (etc / "rtp.conf").write_text(
            f"[general]\nrtpstart={self.rtp_ports[0]}\nrtpend={self.rtp_ports[1]}\n"
        )
        (etc / "musiconhold.conf").write_text("[general]\n[default]\nmode=files\ndirectory=moh\n")
        moh_tone(self.host_path("/usr/share/asterisk/moh"))
        (etc / "pjsip_local.conf").write_text(self._test_endpoints())
        for name, text in self.extra_conf.items():
            path = etc / name
            path.write_text((path.read_text() + "\n" if path.exists() else "") + text)

    def _asterisk_conf(self) -> str:
        n = self.name
        return f"""\
[directories]
astcachedir => /var/cache/asterisk
astetcdir => {self.etc}
astmoddir => /usr/lib/x86_64-linux-gnu/asterisk/modules
astvarlibdir => /var/lib/asterisk
astdbdir => /var/lib/asterisk-{n}
astkeydir => /var/lib/asterisk
astdatadir => /usr/share/asterisk
astagidir => /usr/share/asterisk/agi-bin
astspooldir => /var/spool/asterisk-{n}
astrundir => /var/run/asterisk-{n}
astlogdir => /var/log/asterisk-{n}
astsbindir => /usr/sbin

[options]
systemname = {n}
entityid = 02:fc:00:00:{self.ports.sip // 256 % 256:02x}:{self.ports.sip % 256:02x}
"""

    def _patch(self, name: str, text: str) -> str:
        p = self.ports
        if name == "pjsip.conf":
            text = re.sub(r"(?m)^bind=127\.0\.0\.1:5060$", f"bind=127.0.0.1:{p.sip}", text)
        elif name == "http.conf":
            text = re.sub(r"(?m)^bindport=\d+$", f"bindport={p.http}", text)
        elif name == "manager.conf":
            text = re.sub(r"(?m)^port=\d+$", f"port={p.ami}", text)
            text = re.sub(r"(?m)^secret=.*$", f"secret={AMI_SECRET}", text)
        elif name == "ari.conf":
            text = re.sub(r"(?m)^password=.*$", f"password={ARI_PASSWORD}", text)
        elif name == "extensions.conf":
            text += self._extra_dialplan()
        return text

    def _extra_dialplan(self) -> str:
        """Contexts the tests use beside the sample's from-internal."""
        lines = ["", "; ---- added by the test rig", "[rig-apps]"]
        for i, app in enumerate(self.app_names):
            lines.append(f"exten => {9000 + i},1,Stasis({app},${{TARGET}},${{OPTIONS}})")
            lines.append(" same => n,Set(CDR(userfield)=${PUSH_STATUS})")
            lines.append(" same => n,Hangup()")
        lines += [
            "[rig-echo]",
            "exten => _X.,1,Answer()",
            " same => n,Echo()",
            "; [calls] continue_context: ari-push continues an unanswered call at s,1 here",
            "[rig-continue]",
            "exten => s,1,NoOp(rig-continue: PUSH_STATUS=${PUSH_STATUS})",
            " same => n,Answer()",
            " same => n,Echo()",
            "",
        ]
        if self.extra_dialplan:
            lines += ["; ---- extra_dialplan", self.extra_dialplan, ""]
        return "\n".join(lines)

    def _test_endpoints(self) -> str:
        out = ["; test endpoints: push AORs a test can take for itself"]
        for aor in range(TEST_AOR_FIRST, TEST_AOR_FIRST + TEST_AOR_COUNT):
            out += [f"[{aor}](phone-endpoint)", f"aors={aor}", f"[{aor}](push-aor)", "minimum_expiration=1", ""]
        out += ["; qualified push AORs: Asterisk's OPTIONS tell ari-push an awake phone from a sleeping one"]
        for aor in range(QUALIFY_AOR_FIRST, QUALIFY_AOR_FIRST + QUALIFY_AOR_COUNT):
            out += [f"[{aor}](phone-endpoint)", f"aors={aor}", f"[{aor}](push-aor)", "minimum_expiration=1",
                    "qualify_frequency=2", "qualify_timeout=1.0", ""]
        if self.extra_pjsip:
            out += ["; ---- extra_pjsip", self.extra_pjsip, ""]
        return "\n".join(out)

    # ---------------------------------------------------------------- lifecycle

    kind = "asterisk"
    error = AsteriskError
    ready_poll = 0.2

    def _ports(self) -> list[tuple[int, int]]:
        import socket

        return [(self.ports.http, socket.SOCK_STREAM), (self.ports.ami, socket.SOCK_STREAM),
                (self.ports.sip, socket.SOCK_DGRAM)]

    def _prepare(self) -> None:
        mount_proc(self.root)

    def _command(self) -> list[str]:
        verbose = ["-" + "v" * self.verbose] if self.verbose else []
        return ["chroot", str(self.root), "/usr/sbin/asterisk", "-f", "-C", self.conf, *verbose]

    def _ready(self) -> bool:
        try:  # a CLI that does not answer within its timeout (a loaded machine) is not ready yet
            booted = self.cli("core waitfullybooted", timeout=5, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False
        return booted and self._ari_up()

    def _ari_up(self) -> bool:
        try:
            self.ari("GET", "/ari/asterisk/info", timeout=2)
        except (OSError, urllib.error.URLError):
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop through the control socket; SIGKILL by PID (never by name) as the last resort."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.cli("core stop now", timeout=5, check=False)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    # ---------------------------------------------------------------- control

    def cli(self, command: str, timeout: float = 10.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["chroot", str(self.root), "/usr/sbin/asterisk", "-C", self.conf, "-rx", command],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and proc.returncode != 0:
            raise AsteriskError(f"asterisk -rx {command!r} failed: {proc.stderr or proc.stdout}")
        return proc

    def ari(self, method: str, path: str, body: object = None, timeout: float = 5.0) -> object:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.ari_url}{path}", data=data, method=method)
        token = base64.b64encode(f"{ARI_USER}:{ARI_PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def log_text(self) -> str:
        """messages.log: verbose(3) lines, e.g. the dialplan's NoOp() output."""
        try:
            return self.host_path(f"/var/log/asterisk-{self.name}/messages.log").read_text(errors="replace")
        except OSError:
            return ""

    def daemon_config(self, redis_url: str = "") -> str:
        """A ari-push TOML pointing at this instance (used by tests, `make run` and the demo)."""
        lines = [
            "[ari]",
            f'url = "{self.ari_url}"',
            f'username = "{ARI_USER}"',
            f'password = "{ARI_PASSWORD}"',
            "[ami]",
            f"port = {self.ports.ami}",
            f'username = "{AMI_USER}"',
            f'secret = "{AMI_SECRET}"',
        ]
        if redis_url:
            lines += ["[redis]", f'url = "{redis_url}"']
        return "\n".join(lines) + "\n"


def outbound_conf(ws_port: int, password: str, bound: int | None = None) -> dict[str, str]:
    """``extra_conf`` for an instance in ARI outbound websocket mode: asterisk-conf/outbound/ as
    documented, pointed at ari-push's port and password; ``bound`` overrides ARI_PUSH_BOUND.
    The caller (2000, from-internal) reaches the outbound context by dialling o<aor>."""
    folder = SAMPLE_CONF / "outbound"
    wsc = (folder / "websocket_client.conf").read_text()
    wsc = wsc.replace("ws://127.0.0.1:8765/ari", f"ws://127.0.0.1:{ws_port}/ari")
    wsc = wsc.replace("password = change-me-outbound", f"password = {password}")
    dialplan = (folder / "extensions.conf").read_text()
    if bound is not None:
        dialplan += f"\n[globals]\nARI_PUSH_BOUND={bound}\n"
    dialplan += "\n[from-internal]\nexten => _oX.,1,Goto(ari-push-outbound,${EXTEN:1},1)\n"
    return {"websocket_client.conf": wsc, "ari.conf": (folder / "ari.conf").read_text(), "extensions.conf": dialplan}
