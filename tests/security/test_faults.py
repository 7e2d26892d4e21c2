"""Faults a robust service must survive: bad checkpoints in the model store (wrong hash, truncated,
unknown architecture, unreadable card, pickles that would run code), training killed or starved of
disk while it saves, SIGTERM under load, and the admin token and audit ids.

Related tests elsewhere (not repeated here): kill -9 mid-epoch then ``--resume`` matching an
uninterrupted run (tests/unit/training/test_train.py), the unit-level card refusals
(tests/unit/training/test_export.py), admin auth and limits on a real server
(tests/integration/test_admin.py).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch

import training.checkpoint as checkpoint
from training.card import CARD_FILE, WEIGHTS_FILE, CardError, load_model
from training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from training.config import load_config
from training.train import CHECKPOINT, METRICS, run_training


# -- helpers --------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this runs ``code``: what a malicious checkpoint would do."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


def _evil_pickle(path: Path, marker: Path, wrap: dict | None = None) -> None:
    """``torch.save`` a payload that creates ``marker`` when loaded with ``weights_only=False``."""
    payload = _RunsCode(f"import pathlib; pathlib.Path({str(marker)!r}).touch()")
    torch.save({**(wrap or {}), "payload": payload}, path)


def _live(tmp: Path) -> None:
    """Positive control: the payload does run code under an unsafe load, so its absence means
    something."""
    marker, evil = tmp / "control.marker", tmp / "control.pt"
    _evil_pickle(evil, marker)
    torch.load(evil, weights_only=False)
    assert marker.exists(), "the payload is inert: the test would prove nothing"
    marker.unlink()


def _edit_card(model_dir: Path, **changes: Any) -> None:
    card = json.loads((model_dir / CARD_FILE).read_text())
    card.update(changes)
    (model_dir / CARD_FILE).write_text(json.dumps(card))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png_request(png: bytes) -> dict:
    return {"instances": [{"b64": base64.b64encode(png).decode()}]}


# -- checkpoint faults on a real server -----------------------------------------------------------
# model name -> (what is wrong, fragment the refusal reason must contain)
FAULTS = {
    "sha-mismatch": "sha256",
    "truncated": "unreadable safetensors",
    "unknown-arch": "unknown architecture",
    "bad-json": "not valid JSON",
    "pickle-weights": "unreadable safetensors",
    "pickle-as-safetensors": "unreadable safetensors",
}


def _faulty_store(model_store: Path, store: Path, markers: Path) -> None:
    """``good`` (a copy of tiny, with malicious pickles lying next to its weights) and one faulty
    copy of tiny per entry of FAULTS."""
    shutil.copytree(model_store / "tiny", store / "good")
    for name in ("model.pt", "pytorch_model.bin", "checkpoint.pt"):
        _evil_pickle(store / "good" / name, markers / f"good-{name}.marker")
    for name in FAULTS:
        shutil.copytree(model_store / "tiny", store / name)

    w = store / "sha-mismatch" / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))

    # Truncated, with a card whose hash matches the truncated bytes: the loader itself must notice.
    w = store / "truncated" / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _edit_card(store / "truncated", weights_sha256=_sha(w))

    _edit_card(store / "unknown-arch", arch="resnet9000_imagenet")

    (store / "bad-json" / CARD_FILE).write_text('{"format": "erc-model-card/1", "name": "bad-json",')

    # The card names a pickle as its weights (and the hash matches): it must never be unpickled.
    (store / "pickle-weights" / WEIGHTS_FILE).unlink()
    evil = store / "pickle-weights" / "weights.pt"
    _evil_pickle(evil, markers / "pickle-weights.marker")
    _edit_card(store / "pickle-weights", weights_file="weights.pt", weights_sha256=_sha(evil))

    # A pickle under the safetensors name.
    evil = store / "pickle-as-safetensors" / WEIGHTS_FILE
    _evil_pickle(evil, markers / "pickle-as-safetensors.marker")
    _edit_card(store / "pickle-as-safetensors", weights_sha256=_sha(evil))


def test_faulty_checkpoints_are_refused_and_the_rest_keep_serving(
    model_store: Path, tmp_path: Path, start_server_fn, mnist_sample
) -> None:
    store, markers = tmp_path / "store", tmp_path / "markers"
    markers.mkdir()
    _live(tmp_path)
    _faulty_store(model_store, store, markers)

    # In process first: each fault is a CardError naming the problem; nothing is unpickled.
    for name, fragment in FAULTS.items():
        with pytest.raises(CardError, match=re.escape(fragment)):
            load_model(store / name)
    load_model(store / "good")
    assert not list(markers.iterdir()), "a pickle from the store was executed"

    srv = start_server_fn(store, tmp_path, ERC_DEFAULT_MODEL="good", ERC_MAX_BATCH_SIZE="4")
    try:
        with srv.client() as c:
            ready = c.get("/readyz")
            assert ready.status_code == 200, ready.text  # the default model is fine
            detail = ready.json()["models"]
            assert set(detail) == {"good", *FAULTS}
            assert detail["good"] == {"ready": True, "status": "ready"}
            for name, fragment in FAULTS.items():
                entry = detail[name]
                assert entry["ready"] is False and entry["status"] == "failed", (name, entry)
                assert fragment in entry["reason"], (name, entry)

            # Requests to a refused model: 503 model_not_ready, the reason in the message.
            png = mnist_sample.pngs[0]
            for name, fragment in FAULTS.items():
                r = c.post(f"/v1/models/{name}:predict", json=_png_request(png))
                assert r.status_code == 503, (name, r.text)
                err = r.json()["error"]
                assert err["code"] == "model_not_ready" and name in err["message"], err
                assert fragment in err["message"], err
                r = c.post(f"/v1/models/{name}:predict", content=png, headers={"content-type": "image/png"})
                assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
                v2 = c.get(f"/v2/models/{name}/ready")
                assert v2.json()["ready"] is False, v2.text

            # The good model serves, and agrees with itself in process.
            model, _ = load_model(store / "good")
            x = torch.from_numpy(mnist_sample.images[:8]).float().div(255)[:, None]
            with torch.no_grad():
                expected = model(x).argmax(1).tolist()
            body = {"instances": [{"b64": base64.b64encode(p).decode()} for p in mnist_sample.pngs[:8]]}
            r = c.post("/v1/models/good:predict", json=body)
            assert r.status_code == 200, r.text
            assert [p["label"] for p in r.json()["predictions"]] == expected
    finally:
        assert srv.stop(), srv.log.read_text()[-3000:]

    log = srv.log.read_text()
    for name, fragment in FAULTS.items():
        lines = [ln for ln in log.splitlines() if f"model {name} refused" in ln]
        assert lines, f"no refusal log line for {name}:\n{log[-3000:]}"
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in log, "refusals are one clear line, not a stack trace"
    assert not list(markers.iterdir()), "a pickle from the store was executed by the server"


# -- training checkpoints ---------------------------------------------------------------------------
def _tiny_cfg(out: Path, epochs: int):
    return load_config(
        overrides={
            "method.name": "er-minus",
            "model.width": 0.125,
            "data.train_subset": 300,
            "data.eval_subset": 100,
            "data.batch_size": 50,
            "run.epochs": epochs,
            "run.progress": False,
            "run.threads": 1,
            "run.out_dir": str(out),
        }
    )


def _epochs(run: Path) -> list[int]:
    return [json.loads(ln)["epoch"] for ln in (run / METRICS).read_text().splitlines() if ln.strip()]


def test_malicious_training_checkpoint_is_refused_on_resume(tmp_path: Path) -> None:
    _live(tmp_path)
    run, marker = tmp_path / "run", tmp_path / "resume.marker"
    run.mkdir()
    # Everything a real checkpoint has at the top level, plus the payload.
    _evil_pickle(run / CHECKPOINT, marker, {"format": CHECKPOINT_FORMAT, "epoch": 1})
    with pytest.raises(Exception, match=r"(?i)weights.only|unpickl"):
        load_checkpoint(run / CHECKPOINT)
    with pytest.raises(Exception, match=r"(?i)weights.only|unpickl"):
        run_training(_tiny_cfg(run, 2), resume=True)  # the code path of `erc train --resume`
    assert not marker.exists(), "resume executed a pickle"
    assert not (run / METRICS).exists(), "nothing was trained on top of a refused checkpoint"


class _FullDisk(io.RawIOBase):
    """A file on a disk that fills up after ``room`` bytes: the write that crosses it writes what
    fits, then fails with ENOSPC (as write(2) does)."""

    def __init__(self, fd: int, room: int) -> None:
        self.fh = io.FileIO(fd, "wb")
        self.room = room
        self.failed = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        if len(data) > self.room:
            self.fh.write(data[: self.room])
            self.room = 0
            self.failed = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def fileno(self) -> int:
        return self.fh.fileno()

    def flush(self) -> None:
        if not self.fh.closed:
            self.fh.flush()

    def close(self) -> None:
        super().close()
        self.fh.close()


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    run_training(_tiny_cfg(run, 1))
    ckpt = run / CHECKPOINT
    before = ckpt.read_bytes()
    assert load_checkpoint(ckpt)["epoch"] == 1

    # Epoch 2 trains, logs, then its checkpoint save hits a full disk halfway through.
    real_fdopen = os.fdopen
    files: list[_FullDisk] = []

    def fdopen(fd: int, mode: str = "r", *a: Any, **kw: Any) -> Any:
        if "w" in mode and "b" in mode:
            files.append(_FullDisk(fd, room=len(before) // 2))
            return files[-1]
        return real_fdopen(fd, mode, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.os, "fdopen", fdopen)
        # torch.save reports the failed write as its own RuntimeError ("unexpected pos ...").
        with pytest.raises((OSError, RuntimeError)):
            run_training(_tiny_cfg(run, 3), resume=True)
    assert [f.failed for f in files] == [True], "the checkpoint was not written through atomic_open"
    # The latest checkpoint is still the complete one of epoch 1; no half-written file is left.
    assert ckpt.read_bytes() == before
    assert load_checkpoint(ckpt)["epoch"] == 1
    names = sorted(p.name for p in run.iterdir())
    assert names == ["checkpoint.pt", "config.yaml", "metrics.jsonl", "summary.json"], names
    assert _epochs(run) == [1, 2], "epoch 2 was logged before its save failed"
    # A full disk can also tear the log line being appended: resume must not trip over it.
    with open(run / METRICS, "a") as fh:
        fh.write('{"epoch": 3, "time": "2026-')

    summary = run_training(_tiny_cfg(run, 3), resume=True)
    assert summary["last"]["epoch"] == 3
    assert _epochs(run) == [1, 2, 3], "each epoch logged exactly once, the torn line dropped"
    assert load_checkpoint(ckpt)["epoch"] == 3
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# -- graceful shutdown under load -------------------------------------------------------------------
def _rows(c: httpx.Client, model: str) -> tuple[float, float]:
    """(rows queued, rows answered) of ``model``, from /metrics."""
    text = c.get("/metrics").text

    def total(name: str) -> float:
        pattern = rf'^{name}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$'
        return sum(float(v) for v in re.findall(pattern, text, flags=re.M))

    return total("erc_queue_depth"), total("erc_images_total")


def test_sigterm_under_load_answers_every_request(
    model_store, tmp_path, mnist_sample, start_server_fn
) -> None:
    """Many requests in flight from many threads, over v1 and v2: each gets a 200 with its full
    answer or a JSON 503, none is lost or reset, and the process exits cleanly in bounded time."""
    srv = start_server_fn(
        model_store, tmp_path, ERC_MODELS="big", ERC_MAX_BATCH_SIZE="1", ERC_MAX_QUEUE="1024"
    )
    k, n = 16, 32  # images per request, requests
    pngs = mnist_sample.pngs[:k]
    v1 = {"instances": [{"b64": base64.b64encode(p).decode()} for p in pngs]}
    x = (mnist_sample.images[:k].astype("float32") / 255).reshape(-1).tolist()
    v2 = {"inputs": [{"name": "input", "shape": [k, 1, 28, 28], "datatype": "FP32", "data": x}]}

    def one(i: int) -> tuple[int, Any]:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            if i % 2:
                r = c.post("/v2/models/big/infer", json=v2)
                ok = r.status_code == 200 and r.json()["outputs"][0]["shape"][0] == k
            else:
                r = c.post("/v1/models/big:predict", json=v1)
                ok = r.status_code == 200 and len(r.json()["predictions"]) == k
            if r.status_code == 503:
                return 503, r.json()["error"]["code"]
            return r.status_code, ok

    with ThreadPoolExecutor(n) as pool, srv.client() as c:
        futures = [pool.submit(one, i) for i in range(n)]
        # SIGTERM once the server has read and queued every request (one forward pass per image
        # behind the paper-size model): they are all in flight, none still on its way.
        # A request is taken whole: while one is queued, the worker is busy with another (neither
        # queued nor answered yet), so queued + answered >= n*k - k means all n were received.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(f.done() for f in futures):
            queued, answered = _rows(c, "big")
            if queued >= k and queued + answered >= n * k - k:
                break
            time.sleep(0.005)
        in_flight = sum(not f.done() for f in futures)
        t0 = time.perf_counter()
        stopped = srv.stop(timeout=60)
        stopped_in = time.perf_counter() - t0
        results = [f.result() for f in futures]  # raises if any request was lost or reset
    assert stopped, srv.log.read_text()[-3000:]
    assert in_flight >= 1, "every request was answered before SIGTERM: nothing was in flight"
    for status, detail in results:
        assert status in (200, 503), results
        if status == 200:
            assert detail is True, results
        else:
            assert detail in ("unavailable", "model_not_ready"), results
    assert sum(s == 200 for s, _ in results) >= 1, results
    assert stopped_in < 20, f"shutdown took {stopped_in:.1f} s"


# -- admin security ---------------------------------------------------------------------------------
def test_admin_token_is_compared_in_constant_time(monkeypatch) -> None:
    import asyncio
    import secrets

    from starlette.requests import Request

    from service.errors import NotFound, Unauthorized
    from service.routes import admin
    from service.settings import Settings

    assert "compare_digest" in inspect.getsource(admin.require_admin)
    calls: list[tuple[bytes, bytes]] = []
    real = secrets.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(admin.secrets, "compare_digest", spy)

    def check(token: str | None, header: str | None) -> None:
        app = SimpleNamespace(state=SimpleNamespace(settings=Settings(admin_token=token)))
        headers = [(b"authorization", header.encode())] if header is not None else []
        scope = {"type": "http", "app": app, "headers": headers, "method": "GET", "path": "/admin/audits"}
        asyncio.run(admin.require_admin(Request(scope)))

    check("s3cret-token", "Bearer s3cret-token")
    assert calls == [(b"s3cret-token", b"s3cret-token")]
    for header in ("Bearer s3cret-tokeN", "Bearer s3cret", "Bearer ", None, "Basic s3cret-token"):
        with pytest.raises(Unauthorized):
            check("s3cret-token", header)
    # Every bearer token, right or wrong, goes through the constant-time comparison.
    assert [given for given, _ in calls] == [b"s3cret-token", b"s3cret-tokeN", b"s3cret", b""]
    for token in (None, ""):
        with pytest.raises(NotFound):  # no token configured: the admin routes do not exist
            check(token, "Bearer ")


def test_audit_ids_are_128_bit_random_hex(tmp_path: Path) -> None:
    from service.audit.manager import AuditManager
    from service.settings import Settings

    manager = AuditManager(Settings(audit_db=f"sqlite:///{tmp_path}/audits.db"))
    ids = [manager.new_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # Unguessable, not a counter or a clock: the bits are spread evenly.
    bits = "".join(f"{int(i, 16):0128b}" for i in ids)
    assert 0.48 < bits.count("1") / len(bits) < 0.52
    assert "token_hex(16)" in inspect.getsource(AuditManager.new_id) or "token_bytes" in inspect.getsource(
        AuditManager.new_id
    )
