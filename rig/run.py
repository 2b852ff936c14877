"""`make run`: a sandbox Asterisk and Redis, and the daemon against them, until Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from rig.asterisk import AsteriskInstance, Ports
from rig.provision import provision
from rig.redis import RedisServer


def run_sandbox() -> int:
    root = provision()
    ast = AsteriskInstance(root, "run", Ports.for_index(9))
    redis = RedisServer()
    ast.write_config()
    ast.start()
    redis.start()
    workdir = Path(tempfile.mkdtemp(prefix="ari-push-run-"))
    config = workdir / "ari-push.toml"
    config.write_text(ast.daemon_config(redis.url) + '[http]\nlisten = "127.0.0.1:18089"\n')
    print(f"[sandbox] Asterisk {ast.name}: SIP 127.0.0.1:{ast.ports.sip}, ARI {ast.ari_url}, "
          f"AMI port {ast.ports.ami}; Redis {redis.url}", file=sys.stderr)
    print(f"[sandbox] daemon config {config}; health http://127.0.0.1:18089/readyz; Ctrl-C stops all",
          file=sys.stderr)
    daemon = subprocess.Popen([sys.executable, "-m", "ari_push", "--config", str(config), "run"])
    try:
        return daemon.wait()
    except KeyboardInterrupt:
        daemon.send_signal(signal.SIGTERM)
        return daemon.wait(20)
    finally:
        if daemon.poll() is None:
            os.kill(daemon.pid, signal.SIGKILL)
        redis.cleanup()
        ast.stop()
