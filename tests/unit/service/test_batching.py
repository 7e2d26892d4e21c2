"""The micro-batcher on its own: one result per request in order, batching under load, no delay
for a lone request, bounded queue, errors isolated per request, clean stop."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from service.batching import Batcher, BatchStats
from service.errors import ModelNotReady, QueueFull, ServiceUnavailable


@dataclass
class Rows:
    values: torch.Tensor

    def rows(self, a: int, b: int) -> Rows:
        return Rows(self.values[a:b])


class Recorder:
    """``2 * x + 1`` (exact, after LitServe's test model), recording batch sizes."""

    def __init__(self, delay: float = 0.0, fail_on: float | None = None) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> Rows:
        with self.lock:
            self.sizes.append(len(x))
        if self.fail_on is not None and bool((x == self.fail_on).any()):
            raise ValueError(f"poisoned input {self.fail_on}")
        if self.delay:
            time.sleep(self.delay)
        return Rows(2 * x + 1)


def _run(coro):
    return asyncio.run(coro)


def test_each_request_gets_its_own_rows_in_order() -> None:
    fn = Recorder(delay=0.01)
    b = Batcher("t", fn, max_batch=8, wait_s=0.02)
    b.start()

    async def main():
        xs = [torch.full((1 + i % 3, 2), float(i)) for i in range(20)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        return xs, outs

    xs, outs = _run(main())
    b.stop()
    for x, out in zip(xs, outs, strict=True):
        assert torch.equal(out.values, 2 * x + 1)
    assert sum(fn.sizes) == sum(len(x) for x in xs)
    assert max(fn.sizes) <= 8
    assert len(fn.sizes) < 20, "concurrent requests were batched"


def test_pixels_and_float_rows_in_one_batch_are_both_scaled_to_the_unit_range() -> None:
    """Decoded images arrive as uint8 pixels, KServe v2 FP32 tensors as floats in [0, 1]: joined
    as they are, the pixels would be promoted to 0..255 floats. A batch of both gets pixel / 255."""
    seen: list[torch.Tensor] = []

    def fn(x: torch.Tensor) -> Rows:
        seen.append(x)
        return Rows(x)

    b = Batcher("t", fn, max_batch=8, wait_s=0.2, gap_s=0.2)
    b.start()
    pixels = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    floats = torch.tensor([[0.5, 0.25, 1.0]])

    async def main():
        return await asyncio.gather(b.submit(pixels), b.submit(floats))

    out_pixels, out_floats = _run(main())
    b.stop()
    assert len(seen) == 1 and seen[0].dtype == torch.float32, "both requests ran in one float batch"
    assert torch.equal(out_pixels.values, torch.tensor([[0.0, 0.2, 1.0]]))
    assert torch.equal(out_floats.values, floats)


def test_a_lone_request_is_not_delayed() -> None:
    fn = Recorder()
    b = Batcher("t", fn, max_batch=32, wait_s=0.5)  # a long window that a lone request must not pay
    b.start()

    async def main():
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            await b.submit(torch.zeros(1, 2))
            times.append(time.perf_counter() - t0)
        return times

    times = _run(main())
    b.stop()
    assert max(times) < 0.1, times
    assert fn.sizes == [1] * 5


def test_batches_fill_under_load() -> None:
    fn = Recorder(delay=0.005)
    b = Batcher("t", fn, max_batch=16, wait_s=0.05)
    b.start()

    async def client(n: int):
        for _ in range(n):
            await b.submit(torch.zeros(1, 2))

    async def main():
        await asyncio.gather(*(client(10) for _ in range(16)))

    _run(main())
    b.stop()
    assert sum(fn.sizes) == 160
    # The window lets the 16 closed-loop clients fill batches: one batch per round of requests,
    # or two that split a round (those queued while a batch runs, then those it answered, e.g.
    # 11, 5, 11, 5: seen about once in eight runs). Without batching it would be 160 batches.
    rounds = 10
    assert len(fn.sizes) <= 2 * rounds + 2, fn.sizes


def test_fewer_clients_than_the_batch_do_not_wait_out_the_window() -> None:
    """4 closed-loop clients, batches of up to 32, a 0.5 s window: once the 4 requests are in and
    nothing else arrives for ``gap_s``, the batch runs (the window alone would cost 0.5 s a batch)."""
    fn = Recorder(delay=0.002)
    b = Batcher("t", fn, max_batch=32, wait_s=0.5, gap_s=0.005)
    b.start()

    async def client(n: int):
        for _ in range(n):
            await b.submit(torch.zeros(1, 2))

    async def main():
        t0 = time.perf_counter()
        await asyncio.gather(*(client(6) for _ in range(4)))
        return time.perf_counter() - t0

    elapsed = _run(main())
    b.stop()
    assert sum(fn.sizes) == 24
    assert elapsed < 1.0, (elapsed, fn.sizes)  # at least 5 batches: >= 2.5 s if each waited
    assert max(fn.sizes) == 4, fn.sizes  # and the gap did not split the bursts


def test_a_request_being_read_is_waited_for_beyond_the_gap() -> None:
    fn = Recorder()
    b = Batcher("t", fn, max_batch=32, wait_s=0.5, gap_s=0.002)
    b.start()

    async def late():
        with b.expecting():  # reading and decoding its body takes a while
            await asyncio.sleep(0.05)
            return await b.submit(torch.ones(1, 2))

    async def main():
        task = asyncio.create_task(late())
        await asyncio.sleep(0.001)
        first = await b.submit(torch.zeros(1, 2))
        return first, await task

    _run(main())
    b.stop()
    assert fn.sizes == [2], fn.sizes


def test_errors_reach_only_the_request_that_caused_them() -> None:
    fn = Recorder(delay=0.01, fail_on=13.0)
    b = Batcher("t", fn, max_batch=8, wait_s=0.02)
    b.start()

    async def main():
        xs = [torch.full((1, 2), float(i)) for i in range(16)]
        return await asyncio.gather(*(b.submit(x) for x in xs), return_exceptions=True)

    outs = _run(main())
    b.stop()
    bad = [i for i, o in enumerate(outs) if isinstance(o, Exception)]
    assert bad == [13]
    assert "poisoned" in str(outs[13])
    assert all(torch.equal(outs[i].values, torch.full((1, 2), 2.0 * i + 1)) for i in range(16) if i != 13)


def test_full_queue_refuses_at_once() -> None:
    gate = threading.Event()

    def slow(x: torch.Tensor) -> Rows:
        gate.wait(5)
        return Rows(x)

    b = Batcher("t", slow, max_batch=1, wait_s=0.0, max_queue=2)
    b.start()

    async def main():
        first = asyncio.ensure_future(b.submit(torch.zeros(1, 1)))  # taken by the worker, blocks
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(b.submit(torch.zeros(1, 1))) for _ in range(2)]
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        with pytest.raises(QueueFull) as exc:
            await b.submit(torch.zeros(1, 1))
        refused_in = time.perf_counter() - t0
        gate.set()
        await asyncio.gather(first, *queued)
        return exc.value, refused_in

    err, refused_in = _run(main())
    b.stop()
    assert refused_in < 0.05 and err.headers["Retry-After"] == "1" and err.status == 503


def test_timeout_and_stop() -> None:
    gate = threading.Event()
    b = Batcher("t", lambda x: (gate.wait(5), Rows(x))[1], max_batch=1, wait_s=0.0, timeout_s=0.1)
    b.start()

    async def main():
        with pytest.raises(ServiceUnavailable, match="did not answer"):
            await b.submit(torch.zeros(1, 1))

    _run(main())
    gate.set()
    b.stop()
    assert not b.running

    async def after_stop():
        with pytest.raises(ModelNotReady):
            await b.submit(torch.zeros(1, 1))

    _run(after_stop())


def test_stats_hooks_see_every_batch() -> None:
    seen = []
    stats = BatchStats(on_batch=lambda rows, waits, secs: seen.append((rows, len(waits))))
    b = Batcher("t", Recorder(delay=0.005), max_batch=4, wait_s=0.02, stats=stats)
    b.start()

    async def main():
        await asyncio.gather(*(b.submit(torch.zeros(1, 1)) for _ in range(8)))

    _run(main())
    b.stop()
    assert sum(r for r, _ in seen) == 8 and stats.rows == 8 and stats.batches == len(seen)


def test_several_workers_share_one_queue() -> None:
    fn = Recorder(delay=0.01)
    b = Batcher("t", fn, max_batch=4, wait_s=0.0, workers=3)
    b.start()

    async def main():
        xs = [torch.full((1, 2), float(i)) for i in range(24)]
        return xs, await asyncio.gather(*(b.submit(x) for x in xs))

    xs, outs = _run(main())
    assert b.running
    b.stop()
    assert all(torch.equal(o.values, 2 * x + 1) for x, o in zip(xs, outs, strict=True))
    assert sum(fn.sizes) == 24 and max(fn.sizes) <= 4
