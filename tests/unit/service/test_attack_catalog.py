"""``GET /v1/attacks`` publishes the attack registry (through the real app), and the console builds
its attack list from it instead of keeping one of its own."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from training.attacks import build_attack, build_attacks, list_attacks, list_presets

CONSOLE = Path(__file__).resolve().parents[3] / "service" / "static" / "console"


def test_the_endpoint_lists_every_requestable_attack(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    with TestClient(create_app(Settings(model_store=tmp_path / "store"))) as client:
        r = client.get("/v1/attacks")  # no token: read-only, public
        schema = client.get("/openapi.json").json()
    assert r.status_code == 200, r.text
    body = r.json()
    assert [a["name"] for a in body["attacks"]] == list_attacks()
    assert "adaptive-pgd" not in [a["name"] for a in body["attacks"]]
    assert [p["name"] for p in body["presets"]] == list_presets()
    for a in body["attacks"]:
        for norm in a["norms"]:  # the published defaults are valid parameters, labelled as built
            built = build_attack(a["name"], a["params"], norm)
            assert built.label == a["label"] and built.norm == norm
    pgd = next(a for a in body["attacks"] if a["name"] == "pgd")
    assert pgd["norms"] == ["linf", "l2"] and pgd["params"]["steps"] > 0
    for norm, suite in body["default"].items():
        assert (
            build_attacks([(x["name"], x["params"]) for x in suite["attacks"]], norm).label == suite["label"]
        )
    assert "/v1/attacks" in schema["paths"]


def test_the_console_keeps_no_attack_list() -> None:
    text = (CONSOLE / "console.js").read_text() + (CONSOLE / "index.html").read_text()
    names = {*list_attacks(), *list_presets(), "quick", "strong"}
    quoted = set(re.findall(r"""["'`>]([a-z][a-z0-9-]*)["'`<]""", text))
    assert not quoted & names, quoted & names
    assert "/v1/attacks" in text
