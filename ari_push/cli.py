"""``ari-push``: run the daemon, check a config, inspect contacts, manage stored tokens."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ari_push import __version__
from ari_push.bindings import BindingStore, MemoryStore, RedisStore, StoreUnavailable
from ari_push.contacts import ContactPolicy, ContactRejected, mask_contact_uri, parse_contact, printable
from ari_push.logs import configure
from ari_push.model import Binding, mask, mask_token
from ari_push.redis_keys import Keys
from ari_push.settings import Settings, SettingsError, load, to_display

DEFAULT_CONFIG = "/etc/ari-push/ari-push.toml"
EXIT_CONFIG = 2


def _config_path(args: argparse.Namespace) -> str | None:
    path: str | None = args.config or os.environ.get("ARI_PUSH_CONFIG")
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    return path


def _config_error(exc: SettingsError) -> SystemExit:
    """One line on stderr and exit 2, which the systemd unit does not restart on
    (RestartPreventExitStatus=2): a broken configuration must not loop."""
    print(f"ari-push: configuration error: {exc}", file=sys.stderr)
    return SystemExit(EXIT_CONFIG)


def _load(args: argparse.Namespace, *, providers: bool = False) -> Settings:
    """Read and validate the settings; with ``providers``, also build every push provider
    exactly as ``run`` does (keys parsed, URLs checked), then drop them (they hold no
    connection yet)."""
    try:
        settings = load(_config_path(args))
        if providers:
            from ari_push.push.factory import build_providers

            build_providers(settings)
        return settings
    except SettingsError as exc:
        raise _config_error(exc) from None


def _json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args, providers=True)
    configure(settings.log.level, settings.log.format)
    from ari_push.service import Daemon

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        daemon = Daemon(settings)  # Asterisk or FreeSWITCH, as the settings say
        # What is built now lives as long as the process: out of the collector's sight, a full
        # collection has less to walk (measured with 1000 calls waiting: the longest pause, a
        # full collection, 127 -> 76 ms). Frozen objects no longer count as long-lived, so full
        # collections then came often (4 of 28-65 ms in a 1000-call run): one per 100 middle
        # collections, not 10, leaves none in such a run (docs/performance.md, section 6).
        # In the daemon's process only, not in an embedding one.
        gc.collect()
        gc.freeze()
        gc.set_threshold(700, 10, 100)
        await daemon.run(stop)

    try:
        asyncio.run(main())
    except (SettingsError, ExceptionGroup) as exc:  # a part the daemon builds at start refused its settings
        found = _settings_error(exc)
        if found is None:
            raise
        raise _config_error(found) from None
    return 0


def _settings_error(exc: BaseException) -> SettingsError | None:
    if isinstance(exc, SettingsError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _settings_error(inner)
            if found is not None:
                return found
    return None


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args, providers=True)
    print(_json(to_display(settings)))
    print("configuration OK", file=sys.stderr)
    return 0


def cmd_version(_: argparse.Namespace) -> int:
    print(f"ari-push {__version__}")
    return 0


def binding_view(b: Binding, reveal: bool) -> dict[str, object]:
    """A binding as the CLI shows it: every token masked unless ``reveal`` (the one rule of
    docs/security.md), and every text escaped so that a phone's User-Agent or contact cannot
    send escape sequences to the admin's terminal, revealed or not."""
    push = asdict(b.push)
    push["token"] = printable(b.push.token if reveal else mask_token(b.push.provider, b.push.token))
    push["extra_tokens"] = [[printable(k), printable(v if reveal else mask_token(b.push.provider, v))]
                            for k, v in b.push.extra_tokens]
    push["options"] = [[printable(k), printable(v)] for k, v in b.push.options]
    push["param"] = printable(b.push.param)
    push["purr"] = printable(b.push.purr if reveal else mask(b.push.purr))
    push["provider"] = printable(b.push.provider)
    return {
        "aor": printable(b.aor), "endpoint": printable(b.endpoint), "device_id": b.device_id, "push": push,
        "contact_uri": printable(b.contact_uri) if reveal else _masked_uri(b),
        "user_agent": printable(b.user_agent), "first_seen": b.first_seen, "last_seen": b.last_seen,
    }


def _masked_uri(b: Binding) -> str:
    """The contact URI with the token and every extra token (Web Push auth secret...) masked,
    then every push parameter masked by the one rule (contacts.mask_contact_uri)."""
    uri = b.contact_uri
    for secret in sorted({b.push.token, *(v for _, v in b.push.extra_tokens)} - {""}, key=len, reverse=True):
        uri = uri.replace(secret, mask_token(b.push.provider, secret))
    return mask_contact_uri(uri)


def cmd_inspect_contact(args: argparse.Namespace) -> int:
    settings = _load(args) if _config_path(args) else Settings()
    policy = ContactPolicy.from_settings(settings.capture)
    try:
        push = parse_contact(args.uri, policy)
    except ContactRejected as exc:
        print(_json({"accepted": False, "reason": exc.reason, "field": exc.field, "message": str(exc)}))
        return 2
    if push is None:
        print(_json({"accepted": False, "reason": "no-push-parameters",
                          "message": "this contact carries no push parameters (a desk phone?)"}))
        return 2
    binding = Binding(aor=args.aor, endpoint=args.aor, push=push, contact_uri=args.uri)
    print(_json({"accepted": True, "binding": binding_view(binding, args.reveal),
                 "served_by": _route(settings, binding)}))
    return 0


def _route(settings: Settings, binding: Binding) -> dict[str, str]:
    """Which provider table will serve the binding, or why none (push/routing.py)."""
    from ari_push.push.factory import build_providers
    from ari_push.push.routing import Router

    try:
        route = Router(settings, build_providers(settings)).route(binding)
    except SettingsError as exc:
        return {"table": "", "why": f"providers cannot be built: {exc}"}
    return {"table": route.table, "why": route.why}


async def _with_store(settings: Settings, action: str, args: argparse.Namespace) -> int:
    store: BindingStore
    client = None
    if settings.redis.embedded:
        print("ari-push: no [redis] configured: the embedded store lives inside the running daemon "
              "and cannot be read from here", file=sys.stderr)
        store = MemoryStore()
    else:
        from ari_push.service import make_redis

        client = make_redis(settings.redis)
        store = RedisStore(client, Keys(settings.redis.key_prefix), settings.capture.retention_days * 86400)
    try:
        if action == "list":
            aors = [args.aor] if args.aor else await store.aors()
            for aor in aors:
                for b in await store.bindings_for(aor):
                    v = binding_view(b, args.reveal)
                    print(f"{v['aor']}\t{b.device_id}\t{v['push']['provider']}\t"  # type: ignore[index]
                          f"{v['push']['token']}\t{v['push']['param']}\t{v['user_agent']}")  # type: ignore[index]
        elif action == "show":
            print(_json([binding_view(b, args.reveal) for b in await store.bindings_for(args.aor)]))
        elif action == "forget":
            n = await store.forget(args.aor, args.device)
            print(f"forgot {n} device(s) of {printable(args.aor)}")
    except StoreUnavailable as exc:
        print(f"ari-push: store unavailable: {exc}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    settings = _load(args)
    return asyncio.run(_with_store(settings, args.tokens_cmd, args))


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ari-push", description="Mobile push notifications for Asterisk.")
    p.add_argument("-c", "--config", help=f"TOML settings file (default $ARI_PUSH_CONFIG or {DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="run the daemon").set_defaults(func=cmd_run)
    sub.add_parser("check-config", help="validate the settings and print them, secrets masked").set_defaults(
        func=cmd_check_config)
    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)

    ic = sub.add_parser("inspect-contact", help="show the binding a contact URI gives, or why it is refused")
    ic.add_argument("uri", help="a contact URI as Asterisk reports it")
    ic.add_argument("--aor", default="(aor)", help="AOR to show in the binding")
    ic.add_argument("--reveal", action="store_true", help="show tokens in full")
    ic.set_defaults(func=cmd_inspect_contact)

    tk = sub.add_parser("tokens", help="list, show or forget stored device bindings")
    tsub = tk.add_subparsers(dest="tokens_cmd", required=True)
    tl = tsub.add_parser("list", help="one line per device")
    tl.add_argument("aor", nargs="?")
    ts = tsub.add_parser("show", help="every stored field of an AOR's devices, as JSON")
    ts.add_argument("aor")
    tf = tsub.add_parser("forget", help="delete an AOR's devices (or one device)")
    tf.add_argument("aor")
    tf.add_argument("device", nargs="?", help="device id (from tokens list); all devices when left out")
    for t in (tl, ts):
        t.add_argument("--reveal", action="store_true", help="show tokens in full")
    tf.set_defaults(reveal=False)
    tk.set_defaults(func=cmd_tokens)
    from ari_push.cli_traces import add_commands  # trace, test-push (docs/operations.md)

    add_commands(sub, _load)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
