"""`erc stack`'s machinery: the API, TorchServe and Debian's Prometheus on 127.0.0.1 from the
deployment's own config files, Prometheus scraping both."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import yaml

from service.stack import PROMETHEUS_CONFIG, prometheus_config, start_stack


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def test_prometheus_config_keeps_everything_but_the_targets(tmp_path: Path) -> None:
    out = prometheus_config(tmp_path / "p.yml", {"erc-api": "127.0.0.1:1", "torchserve": "127.0.0.1:2"})
    base, new = yaml.safe_load(PROMETHEUS_CONFIG.read_text()), yaml.safe_load(out.read_text())
    assert new["global"] == base["global"]
    assert [j["job_name"] for j in new["scrape_configs"]] == ["erc-api", "torchserve"]
    assert [j["static_configs"][0]["targets"] for j in new["scrape_configs"]] == [
        ["127.0.0.1:1"],
        ["127.0.0.1:2"],
    ]


def test_native_stack_scrapes_api_and_torchserve(model_store: Path, tmp_path: Path, mnist_sample) -> None:
    stack = start_stack(model_store, "tiny", tmp_path / "stack", ERC_MODELS="tiny", ERC_TORCH_THREADS="1")
    try:
        assert stack.api is not None and stack.torchserve is not None
        req = urllib.request.Request(
            f"{stack.api.url}/v1/models/tiny:predict",
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
        deadline = time.time() + 60
        health: dict[str, str] = {}
        while time.time() < deadline:
            targets = _get(f"{stack.prometheus_url}/api/v1/targets")["data"]["activeTargets"]
            health = {t["labels"]["job"]: t["health"] for t in targets}
            samples = _get(f"{stack.prometheus_url}/api/v1/query?query=erc_http_requests_total")["data"][
                "result"
            ]
            if health == {"erc-api": "up", "torchserve": "up"} and samples:
                break
            time.sleep(1)
        assert health == {"erc-api": "up", "torchserve": "up"}, health
        assert samples and all(s["metric"]["job"] == "erc-api" for s in samples)
    finally:
        stack.stop()
    assert stack.prometheus is not None and stack.prometheus.poll() is not None
