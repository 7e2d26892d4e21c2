"""The frames between erc serve's HTTP processes and its model process (service/multiproc/protocol.py)."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from service.errors import ModelNotServed, QueueFull
from service.inference import Outputs
from service.multiproc import protocol
from service.served_models import ModelRegistry
from service.settings import Settings


def _body(data: bytes) -> bytes:
    (size,) = struct.unpack("!I", data[:4])
    assert size == len(data) - 4
    return data[4:]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_an_infer_frame_carries_the_rows_exactly(dtype: type) -> None:
    """Decoded images travel as their uint8 pixels (a quarter of the bytes), v2 FP32 rows as floats."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 1, 28, 28)).astype(dtype)
    if dtype == np.float32:
        x /= 255
    frame = protocol.infer_frame(7, "mnist-ér", "entry-1", x)
    rid, name, entry, back = protocol.parse_infer(_body(frame))
    assert (rid, name, entry) == (7, "mnist-ér", "entry-1")
    assert back.shape == x.shape and back.dtype == dtype
    np.testing.assert_array_equal(back, x)
    assert len(frame) < x.nbytes + 64


@pytest.mark.parametrize("typicality", [False, True])
def test_a_result_frame_carries_every_output(typicality: bool) -> None:
    rng = np.random.default_rng(1)
    out = Outputs(
        rng.random((4, 10), dtype=np.float32),
        rng.random((4, 10), dtype=np.float32),
        rng.random((4, 3), dtype=np.float32),
        np.array([1, 9, 0, 3], dtype=np.int64),
    )
    if typicality:
        out.prior_log_density = rng.random(4, dtype=np.float32)
        out.mahalanobis = rng.random(4, dtype=np.float32)
        out.atypical = np.array([True, False, False, True])
    rid, back = protocol.parse_result(_body(protocol.result_frame(2**40, out)))
    assert rid == 2**40
    for name in (
        "logits",
        "probabilities",
        "embedding",
        "label",
        "prior_log_density",
        "mahalanobis",
        "atypical",
    ):
        a, b = getattr(out, name), getattr(back, name)
        if a is None:
            assert b is None
        else:
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def test_an_embedding_free_model_has_zero_width_embeddings() -> None:
    out = Outputs(np.zeros((2, 5), np.float32), np.zeros((2, 5), np.float32), np.zeros((2, 0), np.float32),
                  np.zeros(2, np.int64))  # fmt: skip
    _, back = protocol.parse_result(_body(protocol.result_frame(1, out)))
    assert back.embedding.shape == (2, 0)


def test_errors_come_back_as_the_same_service_error() -> None:
    for exc in (
        QueueFull("model 'm' has 256 images queued (limit 256); retry"),
        ModelNotServed("no model 'x'"),
    ):
        rid, payload = protocol.parse_id(_body(protocol.error_frame(5, exc)))
        back = protocol.error_from(payload)
        assert rid == 5 and type(back) is type(exc)
        assert (back.status, back.code, back.message, back.headers) == (
            exc.status,
            exc.code,
            exc.message,
            exc.headers,
        )
    _, payload = protocol.parse_id(_body(protocol.error_frame(6, RuntimeError("CUDA out of memory"))))
    other = protocol.error_from(payload)
    assert isinstance(other, protocol.RemoteInferenceError) and "CUDA out of memory" in str(other)


def test_frames_are_read_whole_however_the_bytes_arrive() -> None:
    class Collect(protocol.FrameProtocol):
        def __init__(self) -> None:
            super().__init__()
            self.frames: list[bytes] = []

        def frame_received(self, body: bytes) -> None:
            self.frames.append(body)
            if body[:1] == b"C":
                raise ValueError("a handler that fails")  # logged; the next frames still arrive

    async def go() -> list[bytes]:
        proto = Collect()
        data = protocol.id_frame(b"K", 1, {"a": 1}) + protocol.id_frame(b"C", 2) + protocol.id_frame(b"K", 3)
        for i in range(0, len(data), 3):  # arriving in pieces
            proto.data_received(data[i : i + 3])
        proto.data_received(protocol.id_frame(b"K", 4)[:5])  # an incomplete frame waits for the rest
        return proto.frames

    frames = asyncio.run(go())
    assert [protocol.parse_id(f) for f in frames] == [(1, {"a": 1}), (2, None), (3, None)]


def test_a_full_queue_in_the_model_process_makes_every_http_process_unready(
    model_store: Path, tmp_path: Path
) -> None:
    """The model process's table carries a full queue; an HTTP process's /readyz then says
    "queue full" as one process does, and ready again once it drains."""
    from service.multiproc.model_process import table_of
    from service.multiproc.remote import RemoteRegistry

    reg = ModelRegistry(Settings(model_store=model_store, models="tiny", warmup=False, workers=1))
    reg.load_all()
    try:
        remote = RemoteRegistry(
            Settings(model_store=model_store, models="tiny", model_process_socket=tmp_path / "s")
        )
        remote.client.connected = True
        remote._apply_table(json.loads(json.dumps(table_of(reg, None))))
        assert remote.readiness()[0]
        batcher = reg.models["tiny"].batcher
        assert batcher is not None
        batcher.max_queue = 1
        batcher._rows_queued = 3  # what three requests waiting behind a busy forward leave
        remote._apply_table(json.loads(json.dumps(table_of(reg, None))))
        ok, detail = remote.readiness()
        assert not ok and detail["tiny"]["reason"] == "queue full (3 rows)"
        batcher._rows_queued = 0
        remote._apply_table(json.loads(json.dumps(table_of(reg, None))))
        assert remote.readiness()[0]
    finally:
        reg.stop()
