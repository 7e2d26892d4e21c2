"""The model process: every model this replica serves, each with its one batcher, fed by all the
HTTP processes of ``erc serve`` (``ERC_HTTP_PROCESSES`` > 1) over one Unix socket.

It loads, verifies (sha256) and warms the store's models exactly as a single-process server does
(:class:`service.served_models.ModelRegistry`), then listens on ``ERC_MODEL_PROCESS_SOCKET``: the
socket exists once the models are loaded. Each HTTP process holds one connection; its requests
(:mod:`service.multiproc.protocol`) go into the same :class:`service.batching.Batcher` per model,
so a batch mixes the requests of every HTTP process. With the model repository on, the
:class:`service.repository.Reconciler` runs here (this process holds the models); the HTTP
processes forward their ``reconcile`` and ``poke`` to it and route by the table this process
pushes after every change.

SIGTERM (sent by the supervisor once the HTTP processes have drained): stop accepting, answer what
is queued, stop.

    python -m service.multiproc.model_process       # settings from ERC_* variables
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from service.errors import ModelNotReady
from service.multiproc.protocol import (
    ID_SIZE,
    FrameProtocol,
    error_frame,
    frame,
    id_frame,
    parse_id,
    parse_infer,
    result_frame,
)
from service.repository import ModelRecords, Reconciler
from service.served_models import ModelRegistry, ServedModel
from service.settings import Settings

log = logging.getLogger("erc.model_process")


class TableRegistry(ModelRegistry):
    """A registry that says when the repository changed its routing (after the new versions are
    routed, before the old ones leave, and again at the end)."""

    on_change: Callable[[], None] | None = None
    on_draining: Callable[[tuple[str, str], float], None] | None = None

    def _routed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _draining(self, served: ServedModel, timeout_s: float) -> None:
        if self.on_draining is not None:
            self.on_draining((served.name, served.entry), timeout_s)


def table_of(registry: ModelRegistry, replica: str | None) -> dict[str, Any]:
    """What the HTTP processes route by: every version held, its state and what the routes ask of
    its engine (capabilities, typicality, parts served without)."""
    versions = []
    for (name, entry), m in registry.versions.items():
        engine, batcher = m.engine, m.batcher
        versions.append(
            {
                "name": name,
                "entry": entry,
                "path": str(m.path),
                "status": "ready" if m.ready else m.status,
                "reason": m.reason,
                "load_seconds": m.load_seconds,
                "requested": m.requested,
                "sha256": m.card.weights_sha256 if m.card is not None else None,
                "default": registry.models.get(name) is m,
                "capabilities": engine.capabilities.to_dict() if engine is not None else None,
                "typicality": engine is not None and engine.typicality is not None,
                "missing": m.missing,
                # Only a full queue is sent (its depth changes every batch; fullness seldom), so
                # that /readyz in every HTTP process says "queue full" within one look (0.5 s).
                "queue_full_rows": batcher.queued_rows if batcher is not None and batcher.full else None,
            }
        )
    return {
        "versions": versions,
        "unloaded": dict(registry.unloaded),
        "default_name": registry.default_name,
        "replica": replica,
        "pid": os.getpid(),
    }


class ModelServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = TableRegistry(settings)
        self.reconciler: Reconciler | None = None
        self.conns: set[_Connection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.table = b""
        # version being unloaded -> the HTTP processes that may still hold requests for it, and
        # the event the unloading thread waits on (see drain)
        self.drains: dict[tuple[str, str], tuple[set[_Connection], threading.Event]] = {}

    # -- lifecycle ----------------------------------------------------------------------------------
    async def run(self, path: Path) -> None:
        self.loop = loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await loop.run_in_executor(None, self.registry.load_all)
        token = self.settings.admin_token
        if token is not None and token.get_secret_value():
            self.reconciler = Reconciler(
                self.registry, ModelRecords(self.settings.audit_store()), self.settings.repository_poll_s
            )
            self.registry.on_change = lambda: self._from_thread(loop)
            self.registry.on_draining = self.drain
            self.reconciler.start()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = await loop.create_unix_server(self.connect, path=str(path))
        watch = asyncio.ensure_future(self._watch_table())
        log.info("model process %d: serving %s on %s", os.getpid(), ", ".join(self.registry.models), path)
        await stop.wait()
        log.info("model process: stopping (answering what is queued)")
        server.close()
        watch.cancel()
        await loop.run_in_executor(None, self.registry.stop)
        if self.reconciler is not None:
            await loop.run_in_executor(None, self.reconciler.stop)
        await asyncio.sleep(0.05)  # the last answers leave (each connection flushes at the next turn)
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        log.info("model process: stopped")

    # -- the table ----------------------------------------------------------------------------------
    def _from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """:meth:`push_table`, asked by the reconciler's thread."""
        loop.call_soon_threadsafe(self.push_table)

    def push_table(self, *, force: bool = False) -> bool:
        """Send the table to every HTTP process when it changed, or ``force`` (True when sent)."""
        replica = self.reconciler.replica if self.reconciler is not None else None
        data = json.dumps(table_of(self.registry, replica), sort_keys=True).encode()
        if data == self.table and not force:
            return False
        self.table = data
        for conn in list(self.conns):
            conn.send(frame(b"T", data))
        return True

    def drain(self, key: tuple[str, str], timeout_s: float) -> None:
        """From the thread unloading version ``key`` (out of routing, status "unloading"): send
        the table, then wait until every HTTP process says (``D``) that no request of its own
        holds that version any more, or ``timeout_s``. A request an HTTP process routed just before
        the table reached it still gets its answer from this version's batcher."""
        assert self.loop is not None
        done = threading.Event()

        def start() -> None:
            self.drains[key] = (set(self.conns), done)
            self.push_table(force=True)  # each HTTP process answers D for a table showing it unloading
            if not self.conns:
                done.set()

        self.loop.call_soon_threadsafe(start)
        if not done.wait(timeout_s):
            log.warning("model process: %s %s still held by an HTTP process after %g s", *key, timeout_s)
        self.loop.call_soon_threadsafe(self.drains.pop, key, None)

    def drained(self, conn: _Connection, key: tuple[str, str]) -> None:
        """``conn`` holds no request for ``key`` (or went away)."""
        waiting = self.drains.get(key)
        if waiting is None:
            return
        conns, done = waiting
        conns.discard(conn)
        if not conns:
            done.set()

    async def _watch_table(self) -> None:
        """States also change without a repository call (a batcher stopping): look twice a second."""
        while True:
            await asyncio.sleep(0.5)
            self.push_table()

    # -- one HTTP process ---------------------------------------------------------------------------
    def connect(self) -> _Connection:
        conn = _Connection(self)
        self.conns.add(conn)
        return conn

    async def control(self, op: str | None) -> dict[str, Any]:
        """A repository operation asked by an HTTP process; the table goes out before the answer."""
        rec = self.reconciler
        answer: dict[str, Any] = {}
        try:
            if rec is None:
                raise RuntimeError("the model repository is off (no admin token)")
            if op == "reconcile":
                assert self.loop is not None
                await self.loop.run_in_executor(None, rec.reconcile)
            elif op == "poke":
                rec.poke()
            else:
                raise ValueError(f"unknown control operation {op!r}")
        except Exception as exc:
            answer = {"error": type(exc).__name__, "message": str(exc)}
        self.push_table()
        return answer


class _Connection(FrameProtocol):
    """One HTTP process: its requests go into the batchers; each answer is queued on this
    connection when its batch is done (no task per request)."""

    def __init__(self, server: ModelServer) -> None:
        super().__init__()
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.futures: dict[int, asyncio.Future[Any]] = {}
        self.controls: set[asyncio.Future[None]] = set()  # held until done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.server.push_table():  # a new table went to every connection, this one included
            self.send(frame(b"T", self.server.table))

    def frame_received(self, body: bytes) -> None:
        kind = body[:1]
        if kind == b"I":
            self._infer(body)
        elif kind == b"C":
            rid, _ = parse_id(body)
            fut = self.futures.pop(rid, None)
            if fut is not None:
                fut.cancel()  # the batcher drops it before its forward
        elif kind == b"D":
            _, held = parse_id(body)
            self.server.drained(self, (held["name"], held["entry"]))
        elif kind == b"X":
            control = asyncio.ensure_future(self._control(body))
            self.controls.add(control)
            control.add_done_callback(self.controls.discard)
        else:
            log.warning("model process: unknown frame kind %r", kind)

    def _infer(self, body: bytes) -> None:
        rid, _ = parse_id(body[:ID_SIZE])
        try:
            rid, name, entry, x = parse_infer(body)
            served = self.server.registry.versions.get((name, entry))
            if served is None or served.batcher is None:
                raise ModelNotReady(f"model {name!r} (store entry {entry}) is not in the model process")
            fut = served.batcher.enqueue(torch.from_numpy(x.copy()), self.loop)
        except Exception as exc:  # refused at once (a full queue, a stopping model, a bad frame)
            self.send(error_frame(rid, exc))
            return
        self.futures[rid] = fut
        fut.add_done_callback(functools.partial(self._answer, rid))

    def _answer(self, rid: int, fut: asyncio.Future[Any]) -> None:
        self.futures.pop(rid, None)
        if fut.cancelled():
            return
        exc = fut.exception()
        self.send(error_frame(rid, exc) if exc is not None else result_frame(rid, fut.result()))

    async def _control(self, body: bytes) -> None:
        rid, request = parse_id(body)
        answer = await self.server.control((request or {}).get("op"))
        self.send(id_frame(b"K", rid, answer))

    def lost(self) -> None:
        for fut in list(self.futures.values()):
            fut.cancel()
        self.futures.clear()
        self.server.conns.discard(self)
        for key in list(self.server.drains):
            self.server.drained(self, key)


def main() -> None:
    import uvloop

    from service.multiproc.supervisor import child_settings

    settings = child_settings("model process")
    assert settings.model_process_socket is not None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(ModelServer(settings).run(settings.model_process_socket))


if __name__ == "__main__":
    main()
