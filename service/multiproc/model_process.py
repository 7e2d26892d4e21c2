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
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from service.errors import ModelNotReady
from service.multiproc.protocol import (
    error_frame,
    frame,
    id_frame,
    parse_id,
    parse_infer,
    read_frame,
    result_frame,
)
from service.repository import ModelRecords, Reconciler
from service.served_models import ModelRegistry
from service.settings import Settings

log = logging.getLogger("erc.model_process")


class TableRegistry(ModelRegistry):
    """A registry that says when the repository changed what it holds."""

    on_change: Callable[[], None] | None = None

    def apply(self, wanted: list[Any]) -> None:
        super().apply(wanted)
        if self.on_change is not None:
            self.on_change()


def table_of(registry: ModelRegistry, replica: str | None) -> dict[str, Any]:
    """What the HTTP processes route by: every version held, its state and what the routes ask of
    its engine (capabilities, typicality, parts served without)."""
    versions = []
    for (name, entry), m in registry.versions.items():
        engine = m.engine
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
        self.writers: set[asyncio.StreamWriter] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._table = b""

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
            self.reconciler.start()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = await asyncio.start_unix_server(self._serve, path=str(path))
        watch = asyncio.ensure_future(self._watch_table())
        log.info("model process %d: serving %s on %s", os.getpid(), ", ".join(self.registry.models), path)
        await stop.wait()
        log.info("model process: stopping (answering what is queued)")
        server.close()
        watch.cancel()
        await loop.run_in_executor(None, self.registry.stop)
        if self.reconciler is not None:
            await loop.run_in_executor(None, self.reconciler.stop)
        await asyncio.sleep(0)  # let the last answers reach their writers
        for w in list(self.writers):
            w.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        log.info("model process: stopped")

    # -- the table ----------------------------------------------------------------------------------
    def _from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """:meth:`push_table`, asked by the reconciler's thread."""
        loop.call_soon_threadsafe(self.push_table)

    def push_table(self) -> bool:
        """Send the table to every HTTP process when it changed (True when sent)."""
        replica = self.reconciler.replica if self.reconciler is not None else None
        data = json.dumps(table_of(self.registry, replica), sort_keys=True).encode()
        if data == self._table:
            return False
        self._table = data
        for w in list(self.writers):
            if not w.is_closing():
                w.write(frame(b"T", data))
        return True

    async def _watch_table(self) -> None:
        """States also change without a repository call (a batcher stopping): look twice a second."""
        while True:
            await asyncio.sleep(0.5)
            self.push_table()

    # -- one HTTP process ---------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        tasks: dict[int, asyncio.Future[None]] = {}
        controls: set[asyncio.Future[None]] = set()  # held until done (the loop keeps weak references)
        if not self.push_table():  # a new table went to every connection, this one included
            writer.write(frame(b"T", self._table))
        try:
            while True:
                body = await read_frame(reader)
                kind = body[:1]
                if kind == b"I":
                    try:
                        rid, name, entry, x = parse_infer(body)
                    except (ValueError, struct.error, UnicodeDecodeError) as exc:
                        rid, _ = parse_id(body[: struct.calcsize("!cQ")])
                        writer.write(error_frame(rid, ValueError(f"malformed request frame: {exc}")))
                        continue
                    task = asyncio.ensure_future(self._infer(writer, rid, name, entry, x))
                    tasks[rid] = task
                    task.add_done_callback(functools.partial(_forget, tasks, rid))
                elif kind == b"C":
                    rid, _ = parse_id(body)
                    if rid in tasks:
                        tasks[rid].cancel()
                elif kind == b"X":
                    control = asyncio.ensure_future(self._control(writer, body))
                    controls.add(control)
                    control.add_done_callback(controls.discard)
                else:
                    log.warning("model process: unknown frame kind %r; closing the connection", kind)
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the HTTP process went away
        finally:
            for pending in list(tasks.values()):
                pending.cancel()
            self.writers.discard(writer)
            writer.close()

    async def _infer(self, writer: asyncio.StreamWriter, rid: int, name: str, entry: str, x: Any) -> None:
        try:
            served = self.registry.versions.get((name, entry))
            if served is None or served.batcher is None:
                raise ModelNotReady(
                    f"model {name!r} (store entry {entry}) is not loaded in the model process"
                )
            out = await served.batcher.submit(torch.from_numpy(x.copy()))
            data = result_frame(rid, out)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # every error goes back to the request it belongs to
            data = error_frame(rid, exc)
        if not writer.is_closing():
            writer.write(data)

    async def _control(self, writer: asyncio.StreamWriter, body: bytes) -> None:
        rid, request = parse_id(body)
        op = (request or {}).get("op")
        answer: dict[str, Any] = {}
        rec = self.reconciler
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
        self.push_table()  # before the answer: the HTTP process routes by it once answered
        if not writer.is_closing():
            writer.write(id_frame(b"K", rid, answer))


def _forget(tasks: dict[int, Any], rid: int, _: Any) -> None:
    tasks.pop(rid, None)


def main() -> None:
    import uvloop

    from service.multiproc.supervisor import exit_with_parent

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s [model] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = Settings()
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.model_process_socket is None:
        raise SystemExit("model process: ERC_MODEL_PROCESS_SOCKET is not set (erc serve sets it)")
    exit_with_parent()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(ModelServer(settings).run(settings.model_process_socket))


if __name__ == "__main__":
    main()
