"""The wire format between HTTP processes and the model process (one Unix stream socket each).

Every frame is a 4-byte big-endian length, then a body whose first byte names its kind:

- ``I`` infer (HTTP -> model): request id, model name, store entry, shape, the rows' dtype (``B``:
  uint8 pixels of decoded images, ``f``: float32 in [0, 1] from v2 ``FP32`` tensors), then the rows
  as raw bytes (C order). No pickling: the model process reads them with ``numpy.frombuffer``.
- ``C`` cancel (HTTP -> model): the client of request id went away; dropped before its forward.
- ``R`` result (model -> HTTP): request id, rows n, classes m, embedding width k, a flag for the
  typicality scores, then logits, probabilities, embedding (float32), labels (int64) and, when
  flagged, prior log density, Mahalanobis distance (float32) and the atypical flags (bool).
- ``E`` error (model -> HTTP): request id and a JSON ``{"type", "message", "headers"}``; the HTTP
  process raises the same :mod:`service.errors` class, so the answer is the one a single process
  gives (503 with Retry-After for a full queue, and so on).
- ``X`` control (HTTP -> model) and ``K`` its acknowledgement: request id and a JSON body (the
  model repository's ``reconcile`` and ``poke``).
- ``T`` table (model -> HTTP): JSON, the versions the model process holds, sent on connect and
  after every change (the HTTP processes route by it).
- ``D`` drained (HTTP -> model): JSON ``{"name", "entry"}``, answering a table that shows that
  version unloading: no request of this HTTP process holds it any more, so the model process may
  stop its batcher.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from typing import Any, cast

import numpy as np

from service import errors
from service.inference import Outputs

_LEN = struct.Struct("!I")
_ID = struct.Struct("!cQ")
ID_SIZE = _ID.size
_INFER = struct.Struct("!cQHHBc")  # kind, id, len(name), len(entry), ndim, dtype
_DTYPES = {b"B": np.uint8, b"f": np.float32}
_RESULT = struct.Struct("!cQIIIB")  # kind, id, n, m, k, typicality flag
MAX_FRAME = 1 << 30
log = logging.getLogger(__name__)


class FrameProtocol(asyncio.Protocol):
    """Frames over a Unix stream without a coroutine per read: :meth:`frame_received` is called
    for each whole frame as the bytes arrive; :meth:`send` queues a frame and writes everything
    queued in one call at the loop's next turn (the answers of one batch leave in one write)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flushing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        at, end = 0, len(buf)
        while end - at >= 4:
            size = int.from_bytes(buf[at : at + 4], "big")
            if size > MAX_FRAME:
                log.error("frame of %d bytes: closing the connection", size)
                if self.transport is not None:
                    self.transport.close()
                return
            if end - at - 4 < size:
                break
            body = bytes(buf[at + 4 : at + 4 + size])
            at += 4 + size
            try:
                self.frame_received(body)
            except Exception:  # one bad frame must not take the connection down
                log.exception("frame %r could not be handled", body[:1])
        if at:
            del buf[:at]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        self.lost()

    def send(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def frame_received(self, body: bytes) -> None:
        raise NotImplementedError

    def lost(self) -> None:
        """The peer has gone (or the connection was closed)."""


def frame(*parts: bytes) -> bytes:
    size = sum(len(p) for p in parts)
    return b"".join((_LEN.pack(size), *parts))


# -- infer / cancel ----------------------------------------------------------------------------------
def infer_frame(rid: int, name: str, entry: str, x: np.ndarray) -> bytes:
    code = b"B" if x.dtype == np.uint8 else b"f"
    x = np.ascontiguousarray(x, dtype=_DTYPES[code])
    n, e = name.encode(), entry.encode()
    dims = struct.pack(f"!{x.ndim}I", *x.shape)
    return frame(_INFER.pack(b"I", rid, len(n), len(e), x.ndim, code), n, e, dims, x.tobytes())


def parse_infer(body: bytes) -> tuple[int, str, str, np.ndarray]:
    _, rid, ln, le, ndim, code = _INFER.unpack_from(body)
    at = _INFER.size
    name = body[at : at + ln].decode()
    at += ln
    entry = body[at : at + le].decode()
    at += le
    shape = struct.unpack_from(f"!{ndim}I", body, at)
    at += 4 * ndim
    x = np.frombuffer(body, dtype=_DTYPES[code], offset=at).reshape(shape)
    return rid, name, entry, x


def id_frame(kind: bytes, rid: int, payload: Any = None) -> bytes:
    head = _ID.pack(kind, rid)
    return frame(head) if payload is None else frame(head, json.dumps(payload).encode())


def parse_id(body: bytes) -> tuple[int, Any]:
    _, rid = _ID.unpack_from(body)
    rest = body[_ID.size :]
    return rid, (json.loads(rest) if rest else None)


# -- results ------------------------------------------------------------------------------------------
def result_frame(rid: int, out: Outputs) -> bytes:
    n, m = out.logits.shape
    k = out.embedding.shape[1]
    typ = out.mahalanobis is not None and out.prior_log_density is not None and out.atypical is not None
    parts = [
        _RESULT.pack(b"R", rid, n, m, k, typ),
        np.ascontiguousarray(out.logits, np.float32).tobytes(),
        np.ascontiguousarray(out.probabilities, np.float32).tobytes(),
        np.ascontiguousarray(out.embedding, np.float32).tobytes(),
        np.ascontiguousarray(out.label, np.int64).tobytes(),
    ]
    if typ:
        parts += [
            np.ascontiguousarray(out.prior_log_density, np.float32).tobytes(),
            np.ascontiguousarray(out.mahalanobis, np.float32).tobytes(),
            np.ascontiguousarray(out.atypical, np.bool_).tobytes(),
        ]
    return frame(*parts)


def parse_result(body: bytes) -> tuple[int, Outputs]:
    _, rid, n, m, k, typ = _RESULT.unpack_from(body)
    at = _RESULT.size

    def take(dtype: Any, count: int, shape: tuple[int, ...]) -> np.ndarray:
        nonlocal at
        a = np.frombuffer(body, dtype=dtype, count=count, offset=at).reshape(shape)
        at += a.nbytes
        return a

    out = Outputs(
        take(np.float32, n * m, (n, m)),
        take(np.float32, n * m, (n, m)),
        take(np.float32, n * k, (n, k)),
        take(np.int64, n, (n,)),
    )
    if typ:
        out.prior_log_density = take(np.float32, n, (n,))
        out.mahalanobis = take(np.float32, n, (n,))
        out.atypical = take(np.bool_, n, (n,))
    return rid, out


# -- errors -------------------------------------------------------------------------------------------
def error_frame(rid: int, exc: BaseException) -> bytes:
    payload = {
        "type": type(exc).__name__,
        "message": getattr(exc, "message", None) or str(exc) or type(exc).__name__,
        "code": getattr(exc, "code", None),
        "headers": getattr(exc, "headers", None),
    }
    return id_frame(b"E", rid, payload)


class RemoteInferenceError(RuntimeError):
    """An error of the model process that is not one of the service's own (an HTTP 500)."""


def error_from(payload: dict[str, Any]) -> Exception:
    """The exception an ``E`` frame describes: the same :mod:`service.errors` class (code, message
    and headers included) when it is one."""
    cls = getattr(errors, str(payload.get("type", "")), None)
    message = str(payload.get("message", ""))
    if isinstance(cls, type) and issubclass(cls, errors.ServiceError):
        exc = cls.__new__(cls)
        errors.ServiceError.__init__(exc, message, code=payload.get("code"), headers=payload.get("headers"))
        return exc
    return RemoteInferenceError(f"the model process failed: {payload.get('type')}: {message}")
