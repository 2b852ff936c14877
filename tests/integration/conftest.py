"""Integration-tier hygiene: every SIP socket a test opens is closed by that test.

A socket left open is closed here (inside the test's event loop, so no ResourceWarning turns
up later in some unrelated test) and, if the test itself passed, the test fails and names
the phones it left open. A failing test is already failing: its leftovers are only closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from typing import Any

import pytest

from rig import sipua


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.when == "call":
        item.stash[_PASSED] = report.passed
    return report


_PASSED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
async def sip_sockets_closed(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    before = set(sipua.OPEN)
    yield
    left = [ua for ua in list(sipua.OPEN) if ua not in before]
    for ua in left:
        ua.close()
    if left and request.node.stash.get(_PASSED, False):
        pytest.fail(f"the test left {len(left)} SIP socket(s) open: "
                    f"{sorted(f'{ua.user}@127.0.0.1:{ua.port}' for ua in left)}")
