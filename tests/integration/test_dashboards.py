"""The Grafana dashboard and the Prometheus alert rules name only what the daemon really exports.

A real call on the rig (a sleeping phone woken by a push, answered, hung up), then the daemon's
own /metrics is scraped; every query of dashboards/grafana/ari-push.json and every rule of
dashboards/prometheus/alerts.yml is parsed for the metric names, the labels it matches or groups
by, and the label values it compares with, and each must be in that scrape (or, for a label
value, in the daemon's own enums). ``promtool`` (Debian ``prometheus``) checks the rule file,
and the dashboard's queries written out as recording rules, for PromQL syntax.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ari_push.call_flow import Status
from ari_push.model import Dialect, PushKind, PushOutcome
from rig.asterisk import AsteriskInstance
from rig.sipua import SipUA
from tests.integration.test_calls import (  # noqa: F401
    PushEndpoint,
    call_daemon,
    hang_up_and_check,
    push_endpoint,
    sleeping_phone,
    wake_on_push,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "grafana" / "ari-push.json"
ALERTS = ROOT / "dashboards" / "prometheus" / "alerts.yml"
PROMTOOL = "/usr/bin/promtool"
#: labels Prometheus itself adds to every scraped series (target labels), not the daemon
TARGET_LABELS = {"instance", "job"}
#: the values a label may be compared with: the daemon's own enums
LABEL_VALUES = {"result": {o.value for o in PushOutcome}, "status": {s.value for s in Status},
                "kind": {k.value for k in PushKind}, "dialect": {d.value for d in Dialect},
                "link": {"ami", "ari", "redis", "esl"}}
FUNCTIONS = {"sum", "min", "max", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "and", "or",
             "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "abs",
             "clamp_min", "clamp_max", "label_values", "topk", "bottomk", "delta", "deriv", "time", "vector",
             "scalar", "absent", "changes", "resets", "round", "sort", "sort_desc"}


def dashboard_queries() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in data["templating"]["list"] if v.get("type") == "query"]
    return queries


def rule_queries() -> list[str]:
    text = ALERTS.read_text()
    # the file's rules, without a YAML library: each `expr:` is one line or a `|` block
    out: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        if m.group(2).strip() != "|":
            out.append(m.group(2))
            continue
        indent, block = None, []
        for nxt in lines[i + 1:]:
            if not nxt.strip():
                continue
            cur = len(nxt) - len(nxt.lstrip())
            indent = cur if indent is None else indent
            if cur < indent:
                break
            block.append(nxt.strip())
        out.append("\n".join(block))
    return out


def concrete(expr: str) -> str:
    """Grafana's variables replaced by what Prometheus would get."""
    return (expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace('"$instance"', '".*"')
            .replace("$instance", ".*"))


def parse(expr: str) -> tuple[set[str], list[tuple[str, str, str, str]], set[str]]:
    """(metric names, (metric, label, op, value) matchers, grouping labels) of a PromQL expression."""
    expr = concrete(expr)
    matchers: list[tuple[str, str, str, str]] = []
    for sel in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}", expr):
        for m in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"', sel.group(2)):
            matchers.append((sel.group(1) or "", m.group(1), m.group(2), m.group(3)))
    grouping: set[str] = set()
    for g in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        grouping |= {x.strip() for x in g.group(1).split(",") if x.strip()}
    m = re.match(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_]+)\s*\)", expr)
    if m:
        return {m.group(1)}, [], {m.group(2)}
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    names = {t for t in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare) if t not in FUNCTIONS}
    names -= {t for t in names if re.fullmatch(r"\d+[smhd]?", t)}
    return names, matchers, grouping


async def scrape_after_a_call(call_daemon, asterisk: AsteriskInstance, ep: PushEndpoint, aor: str):  # noqa: F811
    phone = await sleeping_phone(asterisk, aor, ep, call_daemon.daemon.store)
    caller = SipUA("2000", asterisk.ports.sip)
    await caller.open()
    answer = caller.start_call(aor)
    await wake_on_push(phone, ep, same_port=False)
    await asyncio.wait_for(phone.invites.get(), 10)
    assert (await asyncio.wait_for(answer, 15)).status == 200
    await hang_up_and_check(phone, caller, asterisk)
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{call_daemon.daemon.health.port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    series: dict[str, set[str]] = {}
    values: dict[tuple[str, str], set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
            for k, v in sample.labels.items():
                values.setdefault((sample.name, k), set()).add(v)
    return series, values


def check(expr: str, series: dict[str, set[str]], where: str) -> list[str]:
    names, matchers, grouping = parse(expr)
    problems = []
    if not names:
        problems.append(f"{where}: no metric found in {expr!r}")
    for name in names:
        if name not in series:
            problems.append(f"{where}: metric {name} is not exported")
    known = set().union(*(series.get(n, set()) for n in names)) | TARGET_LABELS
    for label in grouping:
        if label not in known:
            problems.append(f"{where}: label {label} is on none of {sorted(names)}")
    for metric, label, op, value in matchers:
        if label in TARGET_LABELS:
            continue
        labels = series.get(metric, set()) if metric else known
        if label not in labels:
            problems.append(f"{where}: {metric or '?'} has no label {label}")
        allowed = LABEL_VALUES.get(label)
        if allowed is not None:
            wanted = value.split("|") if op in ("=~", "!~") else [value]
            for v in wanted:
                if v not in allowed:
                    problems.append(f"{where}: {label} is never {v!r} (the daemon's values: {sorted(allowed)})")
    return problems


async def test_every_dashboard_query_and_alert_names_what_the_daemon_exports(
        call_daemon, ensure_asterisk: AsteriskInstance, push_endpoint: PushEndpoint, aor: str) -> None:  # noqa: F811
    series, values = await scrape_after_a_call(call_daemon, ensure_asterisk, push_endpoint, aor)
    assert values[("ari_push_pushes_total", "provider")] == {"vendor"}  # the call was pushed
    assert "ANSWERED" in values[("ari_push_calls_total", "status")]
    queries = [(q, f"dashboard query {i}") for i, q in enumerate(dashboard_queries())]
    queries += [(q, f"alert rule {i}") for i, q in enumerate(rule_queries())]
    assert len(queries) >= 15
    problems = [p for q, where in queries for p in check(q, series, where)]
    assert problems == []


def test_the_checker_catches_a_wrong_name_label_or_value() -> None:
    series = {"ari_push_pushes_total": {"provider", "kind", "result"}, "ari_push_link_up": {"link"}}
    assert check('sum by (provider) (rate(ari_push_pushes_total{result="failed"}[5m]))', series, "q") == []
    assert check("sum(rate(ari_push_push_total[5m]))", series, "q") == ["q: metric ari_push_push_total is not exported"]
    assert check("sum by (device) (ari_push_link_up)", series, "q") == ["q: label device is on none of "
                                                                        "['ari_push_link_up']"]
    assert check('ari_push_pushes_total{outcome="failed"}', series, "q") == [
        "q: ari_push_pushes_total has no label outcome"]
    assert check('ari_push_pushes_total{result=~"failed|dead"}', series, "q")[0].startswith(
        "q: result is never 'dead'")


def _promtool() -> str:
    path = shutil.which("promtool") or PROMTOOL
    if not Path(path).exists():
        pytest.fail("promtool missing: apt-get install prometheus (make sandbox installs it)")
    return path


def test_promtool_checks_the_alert_rules() -> None:
    out = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 4 rules found" in out.stdout


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = tmp_path / "dashboard-queries.yml"
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, q in enumerate(q for q in dashboard_queries() if not q.startswith("label_values(")):
        lines += [f"      - record: ari_push:dashboard_query_{i}", "        expr: |"]
        lines += [f"          {line}" for line in concrete(q).splitlines()]
    rules.write_text("\n".join(lines) + "\n")
    out = subprocess.run([_promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    """The check can fail: a rule with a syntax error is refused."""
    bad = tmp_path / "bad.yml"
    bad.write_text(ALERTS.read_text().replace("min by (instance, link) (ari_push_link_up) == 0",
                                              "min by (instance, link (ari_push_link_up) == 0"))
    out = subprocess.run([_promtool(), "check", "rules", str(bad)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode != 0


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    """Each alert fires on the series that should raise it, after its `for`, with its labels and
    text, and stays quiet on healthy series (dashboards/prometheus/alerts_test.yml)."""
    out = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=ALERTS.parent, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_the_alert_unit_tests_catch_a_changed_rule(tmp_path: Path) -> None:
    """They are not vacuous: a link alert that waits 10 minutes instead of 1 fails them."""
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text().replace("== 0\n        for: 1m", "== 0\n        for: 10m"))
    shutil.copyfile(ALERTS.parent / "alerts_test.yml", tmp_path / "alerts_test.yml")
    out = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode != 0 and "AriPushLinkDown" in out.stdout + out.stderr
