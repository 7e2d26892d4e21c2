"""An HTTP process's view of the model process: the same registry, batcher and engine interfaces
the routes use in a single process, answered over the model process's socket.

- :class:`ModelProcessClient`: the one connection (on this process's event loop), reconnected
  whenever the model process restarts. While it is down every request gets a 503 with
  Retry-After naming why, and ``/readyz`` is 503.
- :class:`RemoteRegistry`: the routing tables (``models``, ``versions``, ``unloaded``) rebuilt from
  the table the model process pushes; each version is a :class:`service.served_models.ServedModel`
  whose ``engine`` is an :class:`EngineView` (card, input spec, capabilities: what the routes ask
  before inference) and whose ``batcher`` is a :class:`RemoteBatcher`.
- :class:`RemoteReconciler`: the model repository's routes run here against the shared record;
  ``reconcile`` and ``poke`` go to the model process, which holds the models.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.errors import ModelNotReady, ServiceUnavailable
from service.imaging import InputSpec
from service.inference import Outputs, require_embedding
from service.multiproc.protocol import (
    FrameProtocol,
    error_from,
    id_frame,
    infer_frame,
    parse_id,
    parse_result,
)
from service.repository import ModelRecords, Reconciler
from service.served_models import DRAIN_S, ModelRegistry, ServedModel
from service.settings import Settings
from training.card import CardError, ModelCard, read_card
from training.formats import Capabilities

log = logging.getLogger(__name__)

RESTARTING = "the model process is not running (erc serve restarts it); retry"


class _ClientProtocol(FrameProtocol):
    def __init__(self, client: ModelProcessClient) -> None:
        super().__init__()
        self.client = client

    def frame_received(self, body: bytes) -> None:
        self.client.dispatch(body)


class ModelProcessClient:
    def __init__(self, path: Path, on_table: Callable[[dict[str, Any] | None], None]) -> None:
        self.path = path
        self.on_table = on_table
        self.connected = False
        self.table: dict[str, Any] | None = None
        self._proto: _ClientProtocol | None = None
        self._pending: dict[int, tuple[asyncio.Future[Any], str]] = {}
        self._deadlines: deque[tuple[float, int, float]] = deque()  # (deadline, id, timeout), in order
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._tasks = [self.loop.create_task(self._run()), self.loop.create_task(self._expire())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        assert self.loop is not None
        waited = 0
        while True:
            try:
                _, proto = await self.loop.create_unix_connection(
                    lambda: _ClientProtocol(self), str(self.path)
                )
            except OSError:
                waited += 1
                if waited % 300 == 0:
                    log.warning("no model process on %s after %d s", self.path, waited // 10)
                await asyncio.sleep(0.1)
                continue
            waited = 0
            self._proto = proto
            try:
                await proto.closed
                log.warning("the model process closed its connection; 503 until it is back")
            finally:
                self.connected = False
                self._proto = None
                if proto.transport is not None:
                    proto.transport.close()
                pending, self._pending = self._pending, {}
                self._deadlines.clear()
                for fut, _ in pending.values():
                    if not fut.done():
                        fut.set_exception(ModelNotReady(RESTARTING, headers={"Retry-After": "1"}))
                self.on_table(None)
            await asyncio.sleep(0.1)

    def dispatch(self, body: bytes) -> None:
        kind = body[:1]
        if kind == b"R":
            rid, out = parse_result(body)
            self._settle(rid, out, None)
        elif kind == b"E":
            rid, payload = parse_id(body)
            self._settle(rid, None, error_from(payload))
        elif kind == b"K":
            rid, payload = parse_id(body)
            self._settle(rid, payload, None)
        elif kind == b"T":
            self.table = json.loads(body[1:])
            self.connected = True
            self.on_table(self.table)
        else:
            log.warning("model process: unknown frame kind %r", kind)

    def _settle(self, rid: int, value: Any, exc: BaseException | None) -> None:
        fut, _ = self._pending.pop(rid, (None, ""))
        if fut is None or fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    async def _expire(self) -> None:
        """Requests past their timeout: answered 503 here, dropped in the model process. One sweep
        a quarter second instead of a timer per request (all of them share the same timeout)."""
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, rid, timeout_s = self._deadlines.popleft()
                if rid not in self._pending:
                    continue
                what = self._pending[rid][1]
                self._settle(rid, None, ServiceUnavailable(
                    f"{what} did not answer within {timeout_s:g} s", headers={"Retry-After": "1"}
                ))  # fmt: skip
                if self._proto is not None:
                    self._proto.send(id_frame(b"C", rid))

    async def _ask(self, data: Callable[[int], bytes], what: str, timeout_s: float) -> Any:
        proto = self._proto
        if not self.connected or proto is None:
            raise ModelNotReady(RESTARTING, headers={"Retry-After": "1"})
        assert self.loop is not None
        rid = next(self._ids)
        fut = self.loop.create_future()
        self._pending[rid] = (fut, what)
        self._deadlines.append((time.monotonic() + timeout_s, rid, timeout_s))
        proto.send(data(rid))
        try:
            return await fut
        except asyncio.CancelledError:  # the client went away: the model process drops the request
            if self._pending.pop(rid, None) is not None and self._proto is proto:
                proto.send(id_frame(b"C", rid))
            raise

    async def infer(self, name: str, entry: str, x: np.ndarray, timeout_s: float) -> Outputs:
        data = functools.partial(infer_frame, name=name, entry=entry, x=x)
        result: Outputs = await self._ask(data, f"model {name!r}", timeout_s)
        return result

    async def control(self, op: str, timeout_s: float) -> dict[str, Any]:
        data = functools.partial(id_frame, b"X", payload={"op": op})
        answer: dict[str, Any] = await self._ask(lambda rid: data(rid=rid), "the model process", timeout_s)
        return answer

    def drained(self, name: str, entry: str) -> None:
        """Tell the model process that no request of this process holds ``(name, entry)``."""
        if self._proto is not None:
            self._proto.send(id_frame(b"D", 0, {"name": name, "entry": entry}))

    def control_threadsafe(self, op: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """:meth:`control` from another thread (the repository routes run in the threadpool)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(self.control(op, timeout_s), self.loop).result(timeout_s + 1)


class RemoteBatcher:
    """The batcher interface the routes use; the batching itself happens in the model process."""

    def __init__(self, client: ModelProcessClient, name: str, entry: str, timeout_s: float) -> None:
        self.client = client
        self.name = name
        self.entry = entry
        self.timeout_s = timeout_s
        self._pending = 0  # being read or decoded here
        self._inflight = 0  # sent to the model process, not answered yet

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        self._pending += 1
        try:
            yield
        finally:
            self._pending -= 1

    async def submit(self, x: torch.Tensor) -> Outputs:
        self._inflight += 1
        try:
            return await self.client.infer(self.name, self.entry, x.numpy(), self.timeout_s)
        finally:
            self._inflight -= 1

    @property
    def running(self) -> bool:
        return self.client.connected

    @property
    def busy(self) -> bool:
        return self._pending > 0 or self._inflight > 0

    # The queue lives in the model process: a full one answers 503 QueueFull from there, and its
    # table says so (queue_full_rows, None while not full), which /readyz reads here.
    full_rows: int | None = None

    @property
    def full(self) -> bool:
        return self.full_rows is not None

    @property
    def queued_rows(self) -> int:
        return self.full_rows or 0

    def stop(self, timeout: float = 10.0, reason: str = "") -> None:
        """Nothing to stop here: the model process owns the batcher."""


@dataclass
class EngineView:
    """What the routes read of an engine before inference (the engine runs in the model process)."""

    card: ModelCard
    capabilities: Capabilities
    typicality: bool | None  # True when the model process scores typicality, else None
    missing: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spec = InputSpec.from_shape(self.card.input_shape)

    @property
    def name(self) -> str:
        return self.card.name

    def require_embedding(self, what: str) -> None:
        require_embedding(self.capabilities, what)


class RemoteRegistry(ModelRegistry):
    """The routing tables of :class:`ModelRegistry`, mirrored from the model process."""

    def __init__(self, settings: Settings) -> None:
        assert settings.model_process_socket is not None
        super().__init__(settings, device=torch.device("cpu"))  # the engines live elsewhere
        self.client = ModelProcessClient(settings.model_process_socket, self._apply_table)
        self._drains: dict[tuple[str, str], asyncio.Task[None]] = {}

    def start(self) -> None:
        self.client.start()

    async def close(self) -> None:
        await self.client.close()

    def load_all(self) -> None:
        raise RuntimeError("an HTTP process loads no model: the model process does")

    def stop(self, timeout: float = 10.0) -> None:
        """The model process stops its batchers; the connection closes with the event loop."""

    def get(self, name: str) -> ServedModel:
        if not self.client.connected and name in self.models:
            raise ModelNotReady(RESTARTING, headers={"Retry-After": "1"})
        return super().get(name)

    def _apply_table(self, table: dict[str, Any] | None) -> None:
        if table is None:  # disconnected: no version is ready (batcher.running), /readyz says why
            for served in self.versions.values():
                if served.status == "ready":
                    served.reason = RESTARTING
            return
        versions: dict[tuple[str, str], ServedModel] = {}
        models: dict[str, ServedModel] = {}
        for row in table["versions"]:
            key = (row["name"], row["entry"])
            held = self.versions.get(key)
            fresh = held is None or held.card is None or held.card.weights_sha256 != row["sha256"]
            served = self._mirror(row) if fresh or held is None else held
            served.status, served.reason = row["status"], row["reason"]
            served.load_seconds, served.requested = row["load_seconds"], row["requested"]
            if isinstance(served.batcher, RemoteBatcher):
                served.batcher.full_rows = row["queue_full_rows"]
                if row["status"] == "unloading" and key not in self._drains:
                    self._drains[key] = asyncio.ensure_future(self._drain(key, served.batcher))
            versions[key] = served
            if row["default"]:
                models[row["name"]] = served
        self.versions, self.models = versions, models
        self.unloaded = dict(table["unloaded"])
        self.default_name = table["default_name"]

    async def _drain(self, key: tuple[str, str], batcher: RemoteBatcher, timeout_s: float = DRAIN_S) -> None:
        """A version being unloaded: once no request here holds it (being read, decoded or sent:
        those still get their answer), say so to the model process, which then stops it."""
        try:
            deadline = time.monotonic() + timeout_s
            while batcher.busy and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            self.client.drained(*key)
        finally:
            self._drains.pop(key, None)

    def _mirror(self, row: dict[str, Any]) -> ServedModel:
        served = ServedModel(row["name"], Path(row["path"]), status=row["status"], reason=row["reason"])
        if row["sha256"] is None or row["capabilities"] is None:
            return served  # refused by the model process: its reason is all there is
        try:
            card = read_card(served.path)
        except CardError as exc:
            served.status, served.reason = "failed", f"the HTTP process cannot read the card: {exc}"
            return served
        served.card = card
        served.engine = EngineView(  # type: ignore[assignment]
            card, Capabilities(**row["capabilities"]), True if row["typicality"] else None, row["missing"]
        )
        served.batcher = RemoteBatcher(  # type: ignore[assignment]
            self.client, row["name"], row["entry"], self.settings.queue_timeout_s
        )
        return served


class RemoteReconciler(Reconciler):
    """The repository routes' reconciler in an HTTP process: the record is read and written here,
    the models are loaded and unloaded by the model process's own :class:`Reconciler`."""

    def __init__(self, registry: RemoteRegistry, model_records: ModelRecords, poll_s: float) -> None:
        super().__init__(registry, model_records, poll_s)
        self.client = registry.client

    @property
    def replica(self) -> str:
        table = self.client.table or {}
        return str(table.get("replica") or "")

    @replica.setter
    def replica(self, value: str) -> None:
        """Set by the base class; this process reports no rows of its own."""

    def start(self) -> None:
        self.ok = True

    def stop(self, timeout: float = 10.0) -> None:
        """Nothing runs here."""

    def poke(self) -> None:
        self._ask("poke")

    def reconcile(self) -> None:
        self._ask("reconcile")

    def _ask(self, op: str) -> None:
        from service.audit.store import StoreError

        answer = self.client.control_threadsafe(op)
        if answer.get("error") == "StoreError":
            raise StoreError(answer.get("message", ""))
        if answer.get("error"):
            raise RuntimeError(f"model process: {answer['error']}: {answer.get('message')}")
