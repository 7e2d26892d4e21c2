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
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.errors import ModelNotReady
from service.imaging import InputSpec
from service.inference import Outputs, require_embedding
from service.multiproc.protocol import (
    error_from,
    id_frame,
    infer_frame,
    parse_id,
    parse_result,
    read_frame,
)
from service.repository import ModelRecords, Reconciler
from service.served_models import ModelRegistry, ServedModel
from service.settings import Settings
from training.card import CardError, ModelCard, read_card
from training.formats import Capabilities

log = logging.getLogger(__name__)

RESTARTING = "the model process is not running (erc serve restarts it); retry"


class ModelProcessClient:
    def __init__(self, path: Path, on_table: Callable[[dict[str, Any] | None], None]) -> None:
        self.path = path
        self.on_table = on_table
        self.connected = False
        self.table: dict[str, Any] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._task = self.loop.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        waited = 0.0
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError:
                await asyncio.sleep(0.1)
                waited += 0.1
                if waited >= 30 and waited % 30 < 0.1:
                    log.warning("no model process on %s after %.0f s", self.path, waited)
                continue
            waited = 0.0
            self._writer = writer
            try:
                while True:
                    self._dispatch(await read_frame(reader))
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                log.warning("the model process closed its connection; 503 until it is back")
            finally:
                self.connected = False
                self._writer = None
                writer.close()
                pending, self._pending = self._pending, {}
                for fut in pending.values():
                    if not fut.done():
                        fut.set_exception(ModelNotReady(RESTARTING, headers={"Retry-After": "1"}))
                self.on_table(None)
            await asyncio.sleep(0.1)

    def _dispatch(self, body: bytes) -> None:
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
        fut = self._pending.pop(rid, None)
        if fut is None or fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    async def _ask(self, data: Callable[[int], bytes], timeout_s: float) -> Any:
        writer = self._writer
        if not self.connected or writer is None:
            raise ModelNotReady(RESTARTING, headers={"Retry-After": "1"})
        assert self.loop is not None
        rid = next(self._ids)
        fut = self.loop.create_future()
        self._pending[rid] = fut
        timer = self.loop.call_later(timeout_s, self._expire, rid, timeout_s)
        writer.write(data(rid))
        try:
            return await fut
        except asyncio.CancelledError:  # the client went away: the model process drops the request
            if self._pending.pop(rid, None) is not None and self._writer is writer:
                writer.write(id_frame(b"C", rid))
            raise
        finally:
            timer.cancel()

    def _expire(self, rid: int, timeout_s: float) -> None:
        self._settle(
            rid,
            None,
            ModelNotReady(
                f"the model process did not answer within {timeout_s:g} s", headers={"Retry-After": "1"}
            ),
        )

    async def infer(self, name: str, entry: str, x: np.ndarray, timeout_s: float) -> Outputs:
        result: Outputs = await self._ask(lambda rid: infer_frame(rid, name, entry, x), timeout_s)
        return result

    async def control(self, op: str, timeout_s: float) -> dict[str, Any]:
        answer: dict[str, Any] = await self._ask(lambda rid: id_frame(b"X", rid, {"op": op}), timeout_s)
        return answer

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
            # The model process enforces the queue timeout; this one only covers a model process
            # that stops answering without closing its socket.
            return await self.client.infer(self.name, self.entry, x.numpy(), self.timeout_s + 5.0)
        finally:
            self._inflight -= 1

    @property
    def running(self) -> bool:
        return self.client.connected

    @property
    def busy(self) -> bool:
        return self._pending > 0 or self._inflight > 0

    # The queue lives in the model process: a full one answers 503 QueueFull from there.
    full = False
    queued_rows = 0

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

    def __init__(self, settings: Settings) -> None:  # no super().__init__: no device here
        assert settings.model_process_socket is not None
        self.settings = settings
        self.models = {}
        self.versions = {}
        self.unloaded = {}
        self.device = torch.device("cpu")
        self.default_name = None
        self._started = []
        self.client = ModelProcessClient(settings.model_process_socket, self._apply_table)

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
            versions[key] = served
            if row["default"]:
                models[row["name"]] = served
        self.versions, self.models = versions, models
        self.unloaded = dict(table["unloaded"])
        self.default_name = table["default_name"]

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
