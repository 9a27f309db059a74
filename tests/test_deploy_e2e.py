"""A real Prometheus, started with deploy/compose's own prometheus.yml and alert rules (only the
scrape targets rewritten to loopback ports), scrapes a running `cdlm serve`; then every query
of the Grafana dashboard is run against it and must return data, the alert rules must evaluate
cleanly, and the server must drain and exit within the Kubernetes shutdown budget.

Needs the `prometheus` binary (Debian package `prometheus`, installed by
scripts/install_system_deps.sh) and a working `cdlm serve`; skips with the reason otherwise.
Traffic stays on 127.0.0.1 and is a handful of bounded requests.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "compose" / "prometheus"
DASHBOARD = ROOT / "deploy" / "compose" / "grafana" / "dashboards" / "cdlm.json"
BASE_DEPLOYMENT = ROOT / "deploy" / "k8s" / "base" / "deployment.yaml"
CDLM = Path(sys.executable).parent / "cdlm"

PROMQL_METRIC = re.compile(r"\b(cdlm:[a-zA-Z0-9_:]+)")
# Grafana variables as the dashboard resolves them with "All" selected.
GRAFANA_VARS = {"$job": ".*", "$instance": ".*", "$__rate_interval": "1m",
                "${job}": ".*", "${instance}": ".*"}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return out


def resolve_grafana_vars(expr: str) -> str:
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    assert "$" not in expr, f"unresolved Grafana variable in {expr}"
    return expr


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`cdlm serve` (the bundled default model, CPU) on a free loopback port."""
    if not CDLM.exists():
        pytest.skip(f"{CDLM} not installed (pip install -e .)")
    probe = subprocess.run([str(CDLM), "serve", "--help"], capture_output=True, text=True,
                           timeout=120)
    if probe.returncode != 0 or "--drain-timeout" not in probe.stdout:
        pytest.skip(f"`cdlm serve` is not available yet: {probe.stderr.strip()[-300:]}")
    port = free_port()
    log = tmp_path_factory.mktemp("cdlm-serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDLM_")}
    env["CDLM_DRAIN_TIMEOUT"] = "30"          # the value the deploy manifests set
    with open(log, "w") as out:
        proc = subprocess.Popen([str(CDLM), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            if proc.poll() is not None:
                raise AssertionError(f"cdlm serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        wait_until(healthy, 300, "cdlm serve /health")
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        yield {"proc": proc, "base": base, "port": port, "model": model, "log": log}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus with deploy/compose/prometheus/prometheus.yml, targets rewritten."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("`prometheus` is not installed (apt-get install prometheus; "
                    "scripts/install_system_deps.sh does it)")
    work = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    port = free_port()
    rewritten = 0
    for job in cfg["scrape_configs"]:
        for sc in job.get("static_configs", []):
            if job["job_name"] == "cdlm":
                sc["targets"] = [f"127.0.0.1:{server['port']}"]
                rewritten += 1
            elif job["job_name"] == "prometheus":
                sc["targets"] = [f"127.0.0.1:{port}"]
    assert rewritten == 1, "prometheus.yml must have exactly one static cdlm target"
    (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    for rule_file in cfg.get("rule_files", []):
        shutil.copy(PROM_DIR / rule_file, work / rule_file)
    log = work / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{log.read_text()[-3000:]}")
            return httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200
        wait_until(ready, 60, "prometheus /-/ready")
        yield {"api": api, "proc": proc, "log": log,
               "scrape_interval": float(cfg["global"]["scrape_interval"].rstrip("s"))}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def query(api: str, expr: str) -> list[dict]:
    r = httpx.get(f"{api}/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def instant_values(api: str, expr: str) -> list[float]:
    return [float(s["value"][1]) for s in query(api, expr)]


@pytest.fixture(scope="module")
def scraped(server, prometheus):
    """Prometheus has scraped the server before and after a handful of real requests."""
    api = prometheus["api"]
    wait_until(lambda: instant_values(api, 'up{job="cdlm"}') == [1.0], 60,
               "the first successful scrape of cdlm")
    client = httpx.Client(base_url=server["base"], timeout=120)
    n_requests = 0
    # 64 tokens = two blocks of 32, so inter-block latency and steps per block get data.
    for i in range(4):
        r = client.post("/v1/completions", json={"model": server["model"], "prompt": f"hi {i}",
                                                   "max_tokens": 64})
        assert r.status_code == 200, r.text
        n_requests += 1
    r = client.post("/v1/chat/completions", json={
        "model": server["model"], "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 40})
    assert r.status_code == 200, r.text
    n_requests += 1
    with client.stream("POST", "/v1/completions", json={
            "model": server["model"], "prompt": "stream", "max_tokens": 48, "stream": True}) as s:
        assert s.status_code == 200
        assert "[DONE]" in "".join(s.iter_text())
    n_requests += 1
    # Concurrent requests make the engine batch (batch size > 1).
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(client.post(
        "/v1/completions", json={"model": server["model"], "prompt": f"batch {i}",
                                 "max_tokens": 64}).status_code)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [200] * 4
    n_requests += 4
    client.close()
    wait_until(lambda: sum(instant_values(
        api, 'cdlm:e2e_request_latency_seconds_count{job="cdlm"}')) >= n_requests,
        60, f"a scrape that saw all {n_requests} requests")
    return {"n_requests": n_requests}


# ----------------------------------------------------------------------------- tests

def test_live_metrics_expose_every_dashboard_metric(server):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server['base']}/metrics", timeout=10).text
    live = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    used = set()
    for _, expr in dashboard_exprs():
        used |= set(PROMQL_METRIC.findall(expr))
    assert used, "no cdlm metric in the dashboard"
    assert used <= live, f"dashboard queries metrics missing from /metrics: {sorted(used - live)}"


def test_prometheus_scrapes_cdlm_with_compose_config(server, prometheus, scraped):
    api = prometheus["api"]
    targets = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
    cdlm = [t for t in targets if t["labels"]["job"] == "cdlm"]
    assert len(cdlm) == 1 and cdlm[0]["health"] == "up", cdlm
    assert cdlm[0]["labels"]["service"] == "cdlm"
    assert instant_values(api, 'cdlm:engine_healthy{job="cdlm"}') == [1.0]
    total = sum(instant_values(api, 'cdlm:request_success_total{job="cdlm"}'))
    assert total >= scraped["n_requests"]


def test_every_dashboard_query_returns_data(prometheus, scraped):
    api = prometheus["api"]
    empty, non_finite = [], []
    for title, expr in dashboard_exprs():
        result = query(api, resolve_grafana_vars(expr))
        if not result:
            empty.append(f"{title}: {expr}")
            continue
        values = [float(s["value"][1]) for s in result]
        if not all(math.isfinite(v) for v in values):
            non_finite.append(f"{title}: {expr} -> {values}")
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
    assert not non_finite, "dashboard queries without a finite value:\n" + "\n".join(non_finite)

    # The numbers mean what the panels say: the requests above had latency, and a block of 32
    # took between 1 and 32 steps.
    p50 = instant_values(api, 'histogram_quantile(0.5, sum by (le) '
                              '(rate(cdlm:e2e_request_latency_seconds_bucket[1m])))')
    assert p50 and p50[0] > 0
    mean_steps = instant_values(api, 'sum(rate(cdlm:steps_per_block_sum[1m])) / '
                                     'sum(rate(cdlm:steps_per_block_count[1m]))')
    assert 1 <= mean_steps[0] <= 32


def test_dashboard_variables_resolve(server, prometheus, scraped):
    api = prometheus["api"]
    jobs = httpx.get(f"{api}/label/job/values", params={"match[]": "cdlm:engine_healthy"},
                     timeout=10).json()["data"]
    assert jobs == ["cdlm"]
    instances = httpx.get(f"{api}/label/instance/values",
                          params={"match[]": 'cdlm:engine_healthy{job=~"cdlm"}'},
                          timeout=10).json()["data"]
    assert instances == [f"127.0.0.1:{server['port']}"]


def test_alert_rules_load_and_evaluate_cleanly(prometheus, scraped):
    api = prometheus["api"]
    expected = {r["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
                for r in g["rules"]}

    def evaluated():
        groups = httpx.get(f"{api}/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = wait_until(evaluated, 60, "one evaluation of every rule")
    assert {r["name"] for r in rules} == expected
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, f"rules failing to evaluate: {bad}"
    firing = {a["labels"]["alertname"] for a in
              httpx.get(f"{api}/alerts", timeout=10).json()["data"]["alerts"]}
    assert not firing & {"CDLMEngineDown", "CDLMTargetDown"}, firing


def test_sigterm_drains_within_the_kubernetes_grace_period(server, scraped):
    """SIGTERM with a request in flight: /health turns 503, the request still completes, and
    the process exits before terminationGracePeriodSeconds - preStop of the Deployment."""
    dep = yaml.safe_load(BASE_DEPLOYMENT.read_text())
    pod = dep["spec"]["template"]["spec"]
    pre = float(re.search(r"\d+", " ".join(
        pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])).group())
    budget = pod["terminationGracePeriodSeconds"] - pre

    proc, base = server["proc"], server["base"]
    result = {}

    def long_request():
        try:
            r = httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": server["model"], "prompt": "drain me", "max_tokens": 512})
            result["status"] = r.status_code
            result["body"] = r.json()
        except Exception as exc:  # noqa: BLE001
            result["error"] = repr(exc)

    t = threading.Thread(target=long_request)
    t.start()
    # Wait until the engine has the request, then terminate as the kubelet would.
    wait_until(lambda: "cdlm:num_requests_running 1.0" in httpx.get(
        f"{base}/metrics", timeout=5).text or "status" in result, 30, "the request to run",
        interval=0.05)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    statuses = []
    while proc.poll() is None and time.monotonic() - start < budget + 5:
        try:
            statuses.append(httpx.get(f"{base}/health", timeout=1).status_code)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    elapsed = time.monotonic() - start
    t.join(timeout=30)
    assert proc.poll() is not None, f"server still running {elapsed:.1f}s after SIGTERM"
    assert elapsed < budget, f"drain took {elapsed:.1f}s, over the {budget:.0f}s budget"
    # Readiness sees 503 (or a closed port) from SIGTERM on: the pod leaves the Service.
    assert set(statuses) <= {503}, f"/health answered other than 503 while draining: {statuses}"
    assert result.get("status") == 200, f"in-flight request was dropped: {result}"
