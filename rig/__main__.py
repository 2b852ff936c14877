"""`python -m rig provision | run | demo`: the sandbox for humans (tests use the fixtures)."""

from __future__ import annotations

import sys

from rig.provision import ProvisionError, provision


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "provision"
    try:
        if cmd == "provision":
            provision()
            return 0
        if cmd == "run":
            from rig.run import run_sandbox

            return run_sandbox()
        if cmd == "demo":
            from rig.demo import main as demo

            return demo(argv[1:])
    except ProvisionError as exc:
        print(f"[sandbox] provisioning failed: {exc}", file=sys.stderr)
        return 1
    print("usage: python -m rig provision|run|demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
