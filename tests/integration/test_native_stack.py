"""`erc stack`'s machinery: the compose topology on 127.0.0.1 from the deployment's own config
files: two API replicas behind Debian's nginx, an audit worker and a private PostgreSQL job store,
TorchServe, and Debian's Prometheus scraping every replica, the worker and TorchServe."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import httpx
import yaml

from service.stack import NGINX_CONFIG, PROMETHEUS_CONFIG, nginx_config, prometheus_config, start_stack


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def test_prometheus_config_keeps_everything_but_the_targets(tmp_path: Path) -> None:
    targets = {
        "erc-api": ["127.0.0.1:1", "127.0.0.1:3"],
        "erc-audit-worker": ["127.0.0.1:4"],
        "torchserve": ["127.0.0.1:2"],
    }
    out = prometheus_config(tmp_path / "p.yml", targets)
    base, new = yaml.safe_load(PROMETHEUS_CONFIG.read_text()), yaml.safe_load(out.read_text())
    assert new["global"] == base["global"]
    assert [j["job_name"] for j in new["scrape_configs"]] == ["erc-api", "erc-audit-worker", "torchserve"]
    assert [j["static_configs"][0]["targets"] for j in new["scrape_configs"]] == list(targets.values())
    assert not any("dns_sd_configs" in j for j in new["scrape_configs"])
    # compose discovers every replica and worker by DNS
    assert {j["job_name"] for j in base["scrape_configs"] if "dns_sd_configs" in j} == {
        "erc-api",
        "erc-audit-worker",
    }


def test_nginx_config_fills_every_placeholder(tmp_path: Path) -> None:
    text = nginx_config(
        tmp_path / "n.conf", ["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3", tmp_path
    ).read_text()
    import re

    assert not re.findall(r"@[A-Z]+@", text)
    assert "server 127.0.0.1:1;" in text and "server 127.0.0.1:2;" in text and "listen 127.0.0.1:3;" in text
    assert "@SERVERS@" in NGINX_CONFIG.read_text()


def test_native_stack_replicas_worker_proxy_and_prometheus(
    model_store: Path, tmp_path: Path, mnist_sample
) -> None:
    stack = start_stack(
        model_store,
        "tiny",
        tmp_path / "stack",
        replicas=2,
        workers=1,
        db="postgresql",
        ERC_MODELS="tiny",
        ERC_TORCH_THREADS="1",
        ERC_AUDIT_THREADS="1",
        ERC_AUDIT_HEARTBEAT_S="0.5",
    )
    try:
        assert len(stack.apis) == 2 and stack.torchserve is not None and stack.postgres is not None
        req = urllib.request.Request(
            f"{stack.url}/v1/models/tiny:predict",
            data=mnist_sample.pngs[0],
            headers={"Content-Type": "image/png"},
        )
        ours = json.load(urllib.request.urlopen(req, timeout=30))
        req = urllib.request.Request(
            f"{stack.torchserve.inference_url}/predictions/tiny",
            data=mnist_sample.pngs[0],
            headers={"Content-Type": "image/png", **stack.torchserve.inference_headers()},
        )
        theirs = json.load(urllib.request.urlopen(req, timeout=30))
        assert ours["predictions"][0]["label"] == theirs["predictions"][0]["label"]

        # An audit through the proxy: run by the worker, read back through the proxy.
        auth = {"Authorization": f"Bearer {stack.admin_token}"}
        with httpx.Client(base_url=stack.url, headers=auth, timeout=60) as c:
            audit = {
                "model": "tiny",
                "data": {"n": 20},
                "eps": [0.1],
                "attacks": [{"name": "fgsm"}],
                "checks": False,
            }
            r = c.post("/admin/audits", json=audit)
            assert r.status_code == 202, r.text
            deadline = time.time() + 240
            while (body := c.get(f"/admin/audits/{r.json()['id']}").json())["status"] != "done":
                assert body["status"] in ("queued", "running") and time.time() < deadline, body
                time.sleep(0.3)
            assert body["result"]["clean"]["n"] == 20
            # Every request reached a replica: both replicas served some of them (round robin).
            for _ in range(6):
                assert c.get("/readyz").status_code == 200
        served = [
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in httpx.get(a.url + "/metrics").text.splitlines()
                if line.startswith("erc_http_requests_total{")
            )
            for a in stack.apis
        ]
        assert all(n > 0 for n in served), served

        deadline = time.time() + 90
        health: list[tuple[str, str]] = []
        while time.time() < deadline:
            targets = _get(f"{stack.prometheus_url}/api/v1/targets")["data"]["activeTargets"]
            health = sorted((t["labels"]["job"], t["health"]) for t in targets)
            # Only a process running an audit worker exports the gauge (the replicas run none).
            workers = _get(
                f"{stack.prometheus_url}/api/v1/query?query=erc_audit_worker_heartbeat_timestamp_seconds"
            )
            if (
                health
                == [
                    ("erc-api", "up"),
                    ("erc-api", "up"),
                    ("erc-audit-worker", "up"),
                    ("torchserve", "up"),
                ]
                and workers["data"]["result"]
            ):
                break
            time.sleep(1)
        assert health == [
            ("erc-api", "up"),
            ("erc-api", "up"),
            ("erc-audit-worker", "up"),
            ("torchserve", "up"),
        ]
        assert {r["metric"]["job"] for r in workers["data"]["result"]} == {"erc-audit-worker"}, workers
        assert all(float(r["value"][1]) > 0 for r in workers["data"]["result"]), workers
    finally:
        stack.stop()
    assert stack.prometheus is not None and stack.prometheus.poll() is not None
    assert stack.proxy is not None and stack.proxy.poll() is not None
