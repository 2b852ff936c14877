"""Provision the test rig: Debian packages and a cached Asterisk 22 root file system.

Stdlib only, so it runs before any virtualenv exists. Every step is idempotent and
fails fast with a message that says what is missing and how to fix it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

APT_PACKAGES = {
    "redis-server": "redis-server",
    "redis-sentinel": "redis-sentinel",
    "sipp": "sip-tester",
    "debootstrap": "debootstrap",
    "linphonec": "linphone-cli",  # liblinphone as a real test phone (tests/integration/test_real_clients.py)
    "stress-ng": "stress-ng",  # make test-under-load: one core kept busy while the suite runs
    # the console's browser tests (tests/browser.py: the system browser and driver, nothing downloaded)
    # and the alert rules' check (tests/integration/test_dashboards.py)
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
    "promtool": "prometheus",
}
SUITE = os.environ.get("ARI_PUSH_DEBIAN_SUITE", "sid")


class ProvisionError(RuntimeError):
    """A provisioning step cannot complete; the message says why and what to do."""


def _apt_source_uris(apt_dir: Path) -> list[str]:
    """The Debian archive URIs this machine's apt uses, in file order (deb822 ``.sources`` and
    one-line ``.list`` files), security and updates archives left out."""
    uris: list[str] = []
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
             *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.lstrip().startswith("#") and not line.startswith(" "):
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                suites = fields.get("suites", "").split()
                if suites and all("security" in s_ for s_ in suites):
                    continue
                uris.extend(fields.get("uris", "").split())
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    rest = [p_ for p_ in parts[1:] if not p_.startswith("[")]
                    if len(rest) >= 2 and "security" not in rest[1]:
                        uris.append(rest[0])
    return [u for u in uris if "/debian" in u and "security" not in u]


def debian_mirror(environ: dict[str, str] | None = None, apt_dir: Path = Path("/etc/apt")) -> str:
    """The mirror debootstrap uses: ``ARI_PUSH_DEBIAN_MIRROR`` if set, else the first Debian
    archive in this machine's apt sources (no host is built in)."""
    env = os.environ if environ is None else environ
    if env.get("ARI_PUSH_DEBIAN_MIRROR"):
        return env["ARI_PUSH_DEBIAN_MIRROR"]
    uris = _apt_source_uris(apt_dir)
    if not uris:
        raise ProvisionError(
            "no Debian archive found in /etc/apt/sources.list{,.d/}; set ARI_PUSH_DEBIAN_MIRROR to a Debian mirror URL"
        )
    return uris[0]


def cache_dir() -> Path:
    return Path(os.environ.get("ARI_PUSH_CACHE", "/var/cache/ari-push"))


def root_dir() -> Path:
    """The unpacked Asterisk root file system shared by every sandbox instance."""
    return cache_dir() / "asterisk-root"


def _say(msg: str) -> None:
    print(f"[sandbox] {msg}", file=sys.stderr, flush=True)


class _Progress:
    """While a long step runs: elapsed seconds and the step's latest log line (debootstrap says
    which package it is at). On a terminal one line is redrawn every second; otherwise (make's
    output piped, CI) a line is printed every 15 s."""

    def __init__(self, what: str, log: Path | None) -> None:
        self.what = what
        self.log = log
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="provision-progress", daemon=True)

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(2)
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def _last_line(self) -> str:
        if self.log is None:
            return ""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1].strip()[:70] if lines else ""

    def _tick(self) -> None:
        period = 1.0 if self.tty else 15.0
        while not self._done.wait(period):
            text = f"[sandbox]   {self.what}: {time.monotonic() - self.started:4.0f} s  {self._last_line()}"
            if self.tty:
                sys.stderr.write("\r\033[K" + text[: shutil.get_terminal_size().columns - 1])
            else:
                sys.stderr.write(text + "\n")
            sys.stderr.flush()


def _run(cmd: list[str], *, timeout: float, what: str, log: Path | None = None) -> None:
    _say(f"{what} ...")
    started = time.monotonic()
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        with _Progress(what, log):
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ProvisionError(
            f"{what} did not finish within {timeout:.0f}s; is the Debian package registry reachable?"
            + (f" (log: {log})" if log else "")
        ) from exc
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    if proc.returncode != 0:
        tail = ""
        if log and log.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise ProvisionError(f"{what} failed (exit {proc.returncode}).\n{tail}")
    _say(f"{what}: done in {time.monotonic() - started:.1f}s")


def ensure_packages() -> None:
    """Install the Debian packages the rig needs (redis, SIPp, debootstrap, linphonec, stress-ng) if
    absent: one `shutil.which` per binary when all are there, so a warm machine pays nothing."""
    missing = sorted({pkg for binary, pkg in APT_PACKAGES.items() if shutil.which(binary) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise ProvisionError(f"missing {', '.join(missing)}; run as root or `apt-get install {' '.join(missing)}`")
    env_cmd = ["env", "DEBIAN_FRONTEND=noninteractive"]
    log = cache_dir() / "apt.log"
    cache_dir().mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "update", "-q"], timeout=300, what="apt-get update", log=log)
    _run(
        [*env_cmd, "apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        timeout=600,
        what=f"apt-get install {' '.join(missing)}",
        log=log,
    )


def asterisk_version(root: Path) -> str | None:
    status = root / "var/lib/dpkg/status"
    if not status.exists():
        return None
    block = ""
    for chunk in status.read_text(errors="replace").split("\n\n"):
        if chunk.startswith("Package: asterisk\n"):
            block = chunk
            break
    for line in block.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


def _root_ready(root: Path) -> bool:
    return (root / "usr/sbin/asterisk").exists() and asterisk_version(root) is not None


def ensure_asterisk_root() -> Path:
    """Unpack the cached root, or build it with debootstrap and cache it as a tarball."""
    root = root_dir()
    if _root_ready(root):
        return root
    if os.geteuid() != 0:
        raise ProvisionError("building the Asterisk root needs root (debootstrap, chroot)")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(cache.glob("asterisk-root-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    if root.exists():
        unmount_proc(root)
        shutil.rmtree(root)
    if tarballs:
        root.mkdir(parents=True)
        _run(["tar", "-xzf", str(tarballs[-1]), "-C", str(root)], timeout=300, what=f"unpack {tarballs[-1].name}")
    else:
        if shutil.which("debootstrap") is None:
            raise ProvisionError("debootstrap is not installed (apt-get install debootstrap)")
        partial = cache / "asterisk-root.partial"
        if partial.exists():
            unmount_proc(partial)
            shutil.rmtree(partial)
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=asterisk,asterisk-modules",
                SUITE,
                str(partial),
                debian_mirror(),
            ],
            timeout=900,
            what=f"debootstrap Debian {SUITE} with asterisk (about a minute)",
            log=cache / "debootstrap.log",
        )
        version = asterisk_version(partial)
        if version is None:
            raise ProvisionError(f"debootstrap finished but asterisk is not installed in {partial}")
        safe = version.replace("/", "_").replace(":", "_")
        tarball = cache / f"asterisk-root-{safe}.tar.gz"
        _run(
            ["tar", "-czf", str(tarball), "--exclude=./proc/*", "--exclude=./var/cache/apt/archives/*.deb", "-C",
             str(partial), "."],
            timeout=600,
            what=f"cache root as {tarball.name}",
        )
        partial.rename(root)
    if not _root_ready(root):
        raise ProvisionError(f"{root} has no usable asterisk after unpacking; delete {cache} and retry")
    return root


def mount_proc(root: Path) -> None:
    proc = root / "proc"
    proc.mkdir(exist_ok=True)
    if not (proc / "self").exists():
        subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)


def unmount_proc(root: Path) -> None:
    proc = root / "proc"
    if (proc / "self").exists():
        subprocess.run(["umount", "-l", str(proc)], check=False)


def provision() -> Path:
    started = time.monotonic()
    ensure_packages()
    root = ensure_asterisk_root()
    mount_proc(root)
    fs = ensure_freeswitch()
    _say(f"ready: Asterisk {asterisk_version(root)} in {root}, FreeSWITCH {FS_VERSION} in {fs} "
         f"({time.monotonic() - started:.1f}s)")
    return root


# ---------------------------------------------------------------- FreeSWITCH (issue 13)

FS_VERSION = "1.10.12"
# The stripped minimal tree rig/build_freeswitch.sh makes on Debian 12; a copy whose checksum is
# this one is unpacked instead of building (15 min). Any other copy is ignored.
FS_PREBUILT = f"freeswitch-{FS_VERSION}-bookworm-min.tar.gz"
FS_PREBUILT_SHA256 = "0e447ad0d54f7e06eb0c60eb65916d236fa5423ad363485d6167882f30b8e4ab"
FS_BUILT = f"freeswitch-{FS_VERSION}-built.tar.gz"  # what a local build leaves in the cache
FS_BUILD_PACKAGES = [
    "build-essential", "autoconf", "automake", "libtool", "libtool-bin", "pkg-config", "libssl-dev",
    "libcurl4-openssl-dev", "libpcre3-dev", "libspeexdsp-dev", "libspeex-dev", "libsqlite3-dev", "libedit-dev",
    "libtiff-dev", "libldns-dev", "uuid-dev", "zlib1g-dev", "libjpeg-dev", "yasm", "libsndfile1-dev"
]
FS_RUNTIME_PACKAGES = [
    "libspeexdsp1", "libspeex1", "libedit2", "libtiff6", "libsndfile1", "libcurl4", "libsqlite3-0",
    "libjpeg62-turbo", "libuuid1", "libssl3", "zlib1g", "libstdc++6"
]
_REPO = Path(__file__).resolve().parent.parent


def freeswitch_tree() -> Path:
    return cache_dir() / f"freeswitch-{FS_VERSION}"


def freeswitch_sources() -> list[Path]:
    """Where the prebuilt tree and the source tarballs are looked for, in order:
    ``ARI_PUSH_FREESWITCH_SOURCES``, ``<cache>/freeswitch-sources``, then a ``shared/vendor/freeswitch``
    directory beside the checkout (the layout of the machines this project is developed on)."""
    dirs = [Path(os.environ["ARI_PUSH_FREESWITCH_SOURCES"])] if os.environ.get("ARI_PUSH_FREESWITCH_SOURCES") else []
    dirs += [cache_dir() / "freeswitch-sources"]
    dirs += [parent / "shared" / "vendor" / "freeswitch" for parent in _REPO.parents]
    return [d for d in dirs if d.is_dir()]


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _missing_libraries(tree: Path) -> list[str]:
    env = dict(os.environ, LD_LIBRARY_PATH=str(tree / "lib"))
    files = [tree / "bin" / "freeswitch", *sorted((tree / "mod").glob("*.so"))]
    out = subprocess.run(["ldd", *map(str, files)], capture_output=True, text=True, env=env, check=False).stdout
    return sorted({line.split()[0] for line in out.splitlines() if "not found" in line})


def _apt_install(packages: list[str], what: str) -> None:
    if os.geteuid() != 0:
        raise ProvisionError(f"{what} needs `apt-get install {' '.join(packages)}` (run as root)")
    log = cache_dir() / "apt.log"
    cmd = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", "--no-install-recommends",
           *packages]
    try:
        _run(cmd, timeout=900, what=f"apt-get install ({what})", log=log)
    except ProvisionError:
        _run(["apt-get", "update", "-q"], timeout=300, what="apt-get update", log=log)
        _run(cmd, timeout=900, what=f"apt-get install ({what})", log=log)


def _unpack_tree(tarball: Path, tree: Path) -> None:
    partial = tree.with_name(tree.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    _run(["tar", "-xzf", str(tarball), "-C", str(partial)], timeout=300, what=f"unpack {tarball.name}")
    if not (partial / "freeswitch" / "bin" / "freeswitch").is_file():
        raise ProvisionError(f"{tarball} has no freeswitch/bin/freeswitch")
    (partial / "freeswitch" / ".ari-push-source").write_text(f"{tarball.name} {_sha256(tarball)}\n")
    if tree.exists():
        shutil.rmtree(tree)
    (partial / "freeswitch").rename(tree)
    shutil.rmtree(partial)


def _build_freeswitch(sources: list[Path]) -> Path:
    """Build the tree from the three source tarballs with rig/build_freeswitch.sh (about 15 min)."""
    for src in sources:
        if all(list(src.glob(pattern)) for pattern in
               (f"freeswitch-*{FS_VERSION}*.tar.gz", "sofia-sip-*.tar.gz", "spandsp-*.tar.gz")):
            break
    else:
        raise ProvisionError(
            f"no FreeSWITCH {FS_VERSION} tree or sources: put {FS_PREBUILT}, or the freeswitch, sofia-sip and "
            f"spandsp source tarballs (docs/freeswitch.md), in {cache_dir() / 'freeswitch-sources'} or set "
            "ARI_PUSH_FREESWITCH_SOURCES to their directory")
    missing = [p for p in FS_BUILD_PACKAGES
               if subprocess.run(["dpkg", "-s", p], capture_output=True, check=False).returncode != 0]
    if missing:
        _apt_install(missing, "FreeSWITCH build dependencies")
    out = cache_dir() / FS_BUILT
    _run(["bash", str(_REPO / "rig" / "build_freeswitch.sh"), str(src), str(cache_dir() / "freeswitch-build"),
          str(out)], timeout=5400, what=f"build FreeSWITCH {FS_VERSION} from {src} (about 15 min)",
         log=cache_dir() / "freeswitch-build.log")
    shutil.rmtree(cache_dir() / "freeswitch-build", ignore_errors=True)
    return out


def ensure_freeswitch() -> Path:
    """The FreeSWITCH tree in the cache: unpacked from the prebuilt tree when its checksum matches,
    else from an earlier local build, else built from the sources. Safe to run from several
    sessions at once (a lock file serialises them). Runtime libraries missing on the host are
    installed with apt."""
    import fcntl

    tree = freeswitch_tree()
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / "freeswitch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (tree / ".ari-push-source").is_file() or not (tree / "bin" / "freeswitch").is_file():
            sources = freeswitch_sources()
            prebuilt = [p for d in sources if (p := d / FS_PREBUILT).is_file()]
            good = [p for p in prebuilt if _sha256(p) == FS_PREBUILT_SHA256]
            for p in prebuilt:
                if p not in good:
                    _say(f"ignoring {p}: its sha256 is not {FS_PREBUILT_SHA256[:16]}...")
            if os.environ.get("ARI_PUSH_FREESWITCH_BUILD") == "1":  # build from source even with a prebuilt tree
                tarball = _build_freeswitch(sources)
            elif good:
                tarball = good[0]
            elif (cache_dir() / FS_BUILT).is_file():
                tarball = cache_dir() / FS_BUILT
            else:
                tarball = _build_freeswitch(sources)
            _unpack_tree(tarball, tree)
        missing = _missing_libraries(tree)
        if missing:
            _say(f"FreeSWITCH needs {', '.join(missing)}")
            _apt_install(list(FS_RUNTIME_PACKAGES), "FreeSWITCH runtime libraries")
            missing = _missing_libraries(tree)
            if missing:
                raise ProvisionError(f"FreeSWITCH in {tree} still misses {', '.join(missing)}")
    return tree
