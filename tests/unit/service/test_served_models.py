"""Model discovery and refusal without a server: broken entries never stop the others."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.errors import ModelNotReady, ModelNotServed
from service.served_models import ModelRegistry
from service.settings import Settings


def test_entries_without_a_card_are_refused_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / ".staging-x").mkdir()  # hidden folders (unfinished exports) are not models
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "card.json").write_text("{not json")
    reg = ModelRegistry(Settings(model_store=tmp_path, warmup=False))
    reg.load_all()
    assert set(reg.models) == {"empty", "garbled"}
    assert "no card" in (reg.models["empty"].reason or "")
    assert "not valid JSON" in (reg.models["garbled"].reason or "")
    ok, detail = reg.readiness()
    assert not ok and detail["empty"]["ready"] is False
    with pytest.raises(ModelNotReady, match="no card"):
        reg.get("empty")
    with pytest.raises(ModelNotServed, match="empty, garbled"):
        reg.get("nope")


def test_missing_store_and_unknown_requested_models(tmp_path: Path) -> None:
    reg = ModelRegistry(Settings(model_store=tmp_path / "absent"))
    reg.load_all()
    assert reg.models == {} and reg.default_name is None and reg.readiness()[0] is False
    reg = ModelRegistry(Settings(model_store=tmp_path, models="a,b"))
    reg.load_all()
    assert {m.reason for m in reg.models.values()} == {
        f"no model 'a' in {tmp_path}",
        f"no model 'b' in {tmp_path}",
    }


def test_settings_validation() -> None:
    assert Settings(models="x, y,").models == ["x", "y"]
    with pytest.raises(ValueError, match="max_instances"):
        Settings(max_instances=10, max_queue=5)


class _Watching(ModelRegistry):
    """Records, at each load, which version of each name is routed and ready."""

    seen: list[dict[str, str]]

    def load(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.seen.append({n: m.entry for n, m in self.models.items() if m.ready})
        return super().load(*args, **kwargs)


def test_a_version_swap_loads_the_new_one_before_the_old_one_leaves(
    model_store: Path, tmp_path: Path
) -> None:
    """The record swaps ``tiny``'s only version for another in one change (what a replica sees
    when a load and an unload land within one poll): the name is never without a ready version
    while the new one loads; a model the record drops entirely leaves at once."""
    from service.repository import Record

    for entry in ("tiny", "big"):
        shutil.copytree(model_store / entry, tmp_path / entry)
    reg = _Watching(Settings(model_store=tmp_path, warmup=False, workers=1))
    reg.seen = []
    try:
        reg.apply([Record("tiny", "tiny", "v1", True, True), Record("other", "big", "v9", True, True)])
        assert {n: m.entry for n, m in reg.models.items()} == {"tiny": "tiny", "other": "big"}
        reg.seen.clear()
        reg.apply([Record("tiny", "big", "v2", True, True)])
        assert reg.seen == [{"tiny": "tiny"}]  # the old version still served while the new loads
        assert reg.get("tiny").entry == "big" and set(reg.versions) == {("tiny", "big")}
        with pytest.raises(ModelNotServed, match="was unloaded"):
            reg.get("other")
    finally:
        reg.stop()
