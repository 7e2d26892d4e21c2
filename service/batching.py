"""Adaptive micro-batching: a queue in front, one inference thread behind (after LitServe).

HTTP handlers ``await batcher.submit(x)`` with a tensor of one request's rows (uint8 pixels or
float32 in [0, 1]; a batch of both is scaled to floats before it is joined); the worker thread
gathers queued requests into batches of at most ``max_batch`` rows, runs the model once, and
answers each request with its own rows. Inference never runs on the event loop.

Batching policy:

- a lone request is not delayed: when nothing else is queued and the previous batch held a single
  request, the worker runs at once;
- under load (the previous batch held several requests, or requests are being read and decoded
  right now) the worker keeps collecting for at most ``wait_s`` while the batch is not full, so
  batches fill instead of alternating full and empty; but only while requests keep coming: when
  none is being read or decoded and none has arrived for ``gap_s``, the batch runs at once
  (fewer clients than ``max_batch`` would otherwise make every batch wait the whole window);
- the queue is bounded (``max_queue`` rows): a full queue raises :class:`QueueFull` (HTTP 503 with
  Retry-After) at once, never an unbounded wait; a request also gives up after ``timeout_s``;
- a failing batch is retried request by request, so an error reaches only the request that
  caused it;
- requests whose client went away are dropped before they cost a forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from service.errors import ModelNotReady, QueueFull, ServiceUnavailable
from service.imaging import unit_range

log = logging.getLogger(__name__)


@dataclass
class _Item:
    x: torch.Tensor
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    arrival: float
    rows: int
    taken: float = 0.0


@dataclass
class BatchStats:
    """Hook for metrics: called after every forward pass (from the worker thread)."""

    on_batch: Callable[[int, list[float], float], None] | None = None  # rows, queue waits, seconds
    on_depth: Callable[[int], None] | None = None
    batches: int = 0
    rows: int = 0


class Batcher:
    def __init__(
        self,
        name: str,
        fn: Callable[[torch.Tensor], Any],  # [n, ...] -> result with .rows(start, stop)
        *,
        max_batch: int = 32,
        wait_s: float = 0.005,
        gap_s: float = 0.003,
        max_queue: int = 256,
        timeout_s: float = 30.0,
        workers: int = 1,
        stats: BatchStats | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or workers < 1:
            raise ValueError("max_batch, max_queue and workers must be >= 1")
        self.name = name
        self.fn = fn
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.gap_s = gap_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.stats = stats or BatchStats()
        self._queue: deque[_Item] = deque()
        self._rows_queued = 0
        self._pending = 0  # requests being read/decoded that will be submitted soon
        self._last_batch_items = 0
        # Wake-up economy: a submit wakes a worker only when one is idle, or when the rows queued
        # complete the batch a collecting worker waits for (each needless wake-up is a GIL hand-off
        # with the event loop, which is busy reading the very requests the batch waits for).
        self._idle_workers = 0
        self._rows_needed = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._stop_reason = ""
        self.workers = workers
        self._threads: list[threading.Thread] = []

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            return
        for i in range(self.workers):
            t = threading.Thread(target=self._run, name=f"batcher-{self.name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0, reason: str = "server shutting down") -> None:
        """Finish what is queued (up to ``timeout``), then refuse the rest (503 with ``reason``)."""
        with self._cond:
            self._stopping = True
            self._stop_reason = reason
            self._cond.notify_all()
        deadline = time.perf_counter() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.perf_counter()))
        with self._cond:
            leftovers = list(self._queue)
            self._queue.clear()
            self._rows_queued = 0
        for item in leftovers:
            self._resolve(item, exc=ServiceUnavailable(reason))

    @property
    def busy(self) -> bool:
        """Whether requests are on their way (being read or decoded) or queued."""
        return self._pending > 0 or self._rows_queued > 0 or bool(self._queue)

    @property
    def running(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads) and not self._stopping

    @property
    def queued_rows(self) -> int:
        return self._rows_queued

    @property
    def full(self) -> bool:
        return self._rows_queued >= self.max_queue

    # -- request side (event loop) ------------------------------------------------------------------
    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Mark a request as on its way (being read or decoded): the worker may wait for it."""
        with self._cond:
            self._pending += 1
        try:
            yield
        finally:
            with self._cond:
                self._pending -= 1

    async def submit(self, x: torch.Tensor) -> Any:
        """Queue ``x`` (``[n, ...]``, n <= max_queue) and wait for its ``n`` output rows."""
        future = self.enqueue(x, asyncio.get_running_loop())
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            raise ServiceUnavailable(
                f"model {self.name!r} did not answer within {self.timeout_s:g} s",
                headers={"Retry-After": "1"},
            ) from None

    def enqueue(self, x: torch.Tensor, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        """Queue ``x`` and return the future of its output rows, resolved on ``loop`` (no timeout:
        :meth:`submit` adds one; cancelling the future drops the request before its forward)."""
        rows = int(x.shape[0])
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            if self._stopping or not self._threads:
                why = f": {self._stop_reason}" if self._stop_reason else ""
                raise ModelNotReady(f"model {self.name!r} is not accepting requests{why}")
            if self._rows_queued + rows > self.max_queue:
                queued, limit = self._rows_queued, self.max_queue
                raise QueueFull(f"model {self.name!r} has {queued} images queued (limit {limit}); retry")
            self._queue.append(_Item(x, future, loop, time.perf_counter(), rows))
            self._rows_queued += rows
            depth = self._rows_queued
            if self._idle_workers or (self._rows_needed and depth >= self._rows_needed):
                self._cond.notify()
        if self.stats.on_depth:
            self.stats.on_depth(depth)
        return future

    # -- worker thread ------------------------------------------------------------------------------
    def _take(self, batch: list[_Item], rows: int) -> int:
        """Move queued items into ``batch`` while they fit; returns the new row count."""
        while self._queue:
            item = self._queue[0]
            if item.future.cancelled():  # client gone: drop it before it costs a forward pass
                self._queue.popleft()
                self._rows_queued -= item.rows
                continue
            if batch and rows + item.rows > self.max_batch:
                break
            self._queue.popleft()
            self._rows_queued -= item.rows
            item.taken = time.perf_counter()
            batch.append(item)
            rows += item.rows
            if rows >= self.max_batch:
                break
        return rows

    def _collect(self) -> list[_Item]:
        """Called with the condition held and the queue non-empty."""
        batch: list[_Item] = []
        rows = self._take(batch, 0)
        under_load = self._last_batch_items > 1 or self._pending > 0 or bool(self._queue)
        if rows < self.max_batch and self.wait_s > 0 and under_load:
            deadline = time.perf_counter() + self.wait_s
            while rows < self.max_batch and not self._stopping:
                if self._queue:
                    before = rows
                    rows = self._take(batch, rows)
                    if rows == before and self._queue:
                        break  # the next request does not fit: run what we have
                    continue
                # A request being read or decoded will come: wait for it up to the window. Otherwise
                # only while arrivals keep coming (a burst of requests from clients whose answers
                # just went out arrives well within gap_s of each other). The queue is empty here,
                # so the newest arrival is the batch's last item.
                until = deadline
                if batch and not self._pending:
                    until = min(deadline, batch[-1].arrival + self.gap_s)
                remaining = until - time.perf_counter()
                if remaining <= 0:
                    break
                self._rows_needed = self.max_batch - rows
                self._cond.wait(remaining)
                self._rows_needed = 0
        self._last_batch_items = len(batch)
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._idle_workers += 1
                    self._cond.wait()
                    self._idle_workers -= 1
                if not self._queue and self._stopping:
                    return
                batch = self._collect()
                depth = self._rows_queued
            if self.stats.on_depth:
                self.stats.on_depth(depth)
            if batch:
                try:
                    self._execute(batch)
                except Exception:  # the worker must outlive any single batch
                    log.exception("batcher %s: unexpected error while answering a batch", self.name)

    def _execute(self, batch: list[_Item]) -> None:
        t0 = time.perf_counter()
        try:
            xs = [it.x for it in batch]
            if any(t.dtype != xs[0].dtype for t in xs):  # uint8 pixels beside v2 FP32 rows
                xs = [unit_range(t) for t in xs]
            x = xs[0] if len(xs) == 1 else torch.cat(xs)
            out = self.fn(x)
        except Exception as exc:
            if len(batch) > 1:
                log.warning("batch of %d requests failed (%s); retrying them one by one", len(batch), exc)
                for item in batch:
                    self._execute([item])
                return
            log.exception("inference failed for one request of model %s", self.name)
            self._resolve(batch[0], exc=exc)
            return
        seconds = time.perf_counter() - t0
        rows = sum(it.rows for it in batch)
        self.stats.batches += 1
        self.stats.rows += rows
        if self.stats.on_batch:
            self.stats.on_batch(rows, [it.taken - it.arrival for it in batch], seconds)
        start = 0
        results = []
        for item in batch:
            results.append((item, out.rows(start, start + item.rows)))
            start += item.rows
        # One wake-up of the event loop per batch, not per request.
        loop = batch[0].loop
        if all(it.loop is loop for it in batch):
            _call_soon(loop, _deliver_all, results)
        else:
            for item, res in results:
                _call_soon(item.loop, _deliver_all, [(item, res)])

    @staticmethod
    def _resolve(item: _Item, *, exc: BaseException) -> None:
        def fail() -> None:
            if not item.future.done():
                item.future.set_exception(exc)

        _call_soon(item.loop, fail)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Hand work to an event loop; a loop that has closed (its client is gone) is skipped."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _deliver_all(results: list[tuple[_Item, Any]]) -> None:
    for item, res in results:
        if not item.future.done():
            item.future.set_result(res)
