"""Provider plug-ins (push/plugins.py): the in-repo example (examples/plugin-company-relay) found
through a real entry point, configured by [[plugin]], accepted by the contact parser, built by the
factory, routed, and pushing to a local TLS relay. The built-ins have the same shape."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ari_push.contacts import ContactPolicy, parse_contact
from ari_push.model import Binding, PushOutcome
from ari_push.push.dispatch import PushDispatcher
from ari_push.push.factory import BUILTIN, build_providers
from ari_push.push.plugins import GROUP, ProviderPlugin, discover, load_plugin
from ari_push.push.routing import Router
from ari_push.settings import SettingsError, load
from tests.fakes import FakeVendor, VendorAnswer
from tests.fakes.builders import message
from tests.fakes.keys import Pki

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "plugin-company-relay"
BASE = '[ari]\npassword = "p"\n[ami]\nsecret = "s"\n'


def install(site: Path, name: str, target: str) -> None:
    """A distribution's metadata with one entry point, as pip would leave it in site-packages."""
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{target}\n")


@pytest.fixture
def example_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    install(site, "ari-push-company-relay", "company-relay = ari_push_company_relay:plugin")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
async def relay(pki: Pki) -> AsyncIterator[FakeVendor]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    fake = await FakeVendor(ssl_context=ctx).start()
    try:
        yield fake
    finally:
        await fake.stop()


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ari-push.toml"
    (tmp_path / "relay.key").write_text("relay-api-key-123\n")
    path.write_text(BASE + text)
    return path


def test_example_is_discovered_through_its_entry_point(example_installed: Path) -> None:
    assert "company-relay" in discover()
    plugin = load_plugin("company-relay")
    assert isinstance(plugin, ProviderPlugin) and tuple(plugin.provider_names) == ("company",)


async def test_configured_plugin_serves_its_contacts_end_to_end(example_installed: Path, tmp_path: Path,
                                                                relay: FakeVendor, pki: Pki) -> None:
    settings = load(config(tmp_path, f'[[plugin]]\nname = "company-relay"\nurl = "{relay.url}/v1/push"\n'
                                     f'api_key_file = "relay.key"\nca_file = "{pki.ca_file}"\n'), environ={})
    assert "company" in settings.capture.extra_providers  # the parser now takes pn-provider=company
    push = parse_contact("sip:1001@192.0.2.1;pn-provider=company;pn-prid=dev-1234",
                         ContactPolicy.from_settings(settings.capture))
    assert push is not None and push.provider == "company"
    binding = Binding("1001", "1001", push, "sip:1001@192.0.2.1")
    providers = build_providers(settings)
    assert str(Router(settings, providers).route(binding)) == "served by plugin[0] (company-relay) (company)"
    dropped: list[str] = []

    async def on_dead(b: Binding, _r: object) -> None:
        dropped.append(b.device_id)

    dispatcher = PushDispatcher(providers, on_dead)
    try:
        assert (await dispatcher.send(binding, message(call_id="c-9"))).outcome is PushOutcome.DELIVERED
        relay.script("/v1/push", VendorAnswer(410))
        assert (await dispatcher.send(binding, message())).outcome is PushOutcome.TOKEN_DEAD
    finally:
        await dispatcher.aclose()
    first = relay.requests[0]
    headers = {k.lower(): v for k, v in first.headers.items()}
    assert headers["authorization"] == "Bearer relay-api-key-123"
    body = json.loads(first.body)
    assert body["device"] == "dev-1234" and body["event"] == "call" and body["call_id"] == "c-9"
    assert dropped == [binding.device_id]


@pytest.mark.parametrize(("table", "key", "why"), [
    ('url = "http://relay.example/push"\napi_key = "k"\n', "plugin[0].url", "https://"),
    ('url = "https://relay.example/push"\n', "plugin[0].api_key", "is required"),
    ('url = "https://relay.example/push"\napi_key = "k"\ncolour = "red"\n', "plugin[0].colour", "unknown key"),
])
def test_plugin_validates_its_table(example_installed: Path, tmp_path: Path, table: str, key: str,
                                    why: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(config(tmp_path, f'[[plugin]]\nname = "company-relay"\n{table}'), environ={})
    assert info.value.key == key and why in info.value.why


def test_broken_plugins_are_refused_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    install(site, "broken-one", "broken = no_such_module_anywhere:plugin")
    install(site, "shapeless", "shapeless = json:dumps")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(SettingsError, match="does not load: ModuleNotFoundError"):
        load_plugin("broken")
    with pytest.raises(SettingsError, match="lacks name/provider_names/configure/build"):
        load_plugin("shapeless")


def test_a_plugin_may_not_take_a_built_in_name(example_installed: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import ari_push_company_relay as example  # type: ignore[import-not-found]

    monkeypatch.setattr(type(example.plugin), "provider_names", ("fcm",))
    with pytest.raises(SettingsError, match="'fcm' is built in"):
        load(config(tmp_path, '[[plugin]]\nname = "company-relay"\nurl = "https://r.example/p"\napi_key = "k"\n'),
             environ={})


def test_built_in_providers_are_plugins_of_the_same_shape() -> None:
    assert [b.name for b in BUILTIN] == ["webhook", "apns", "fcm", "hms", "hmos", "webpush", "vendor"]
    assert all(isinstance(b, ProviderPlugin) for b in BUILTIN)
