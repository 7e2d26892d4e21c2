"""The attack check's own queue and child processes, apart from the prediction batcher.

A request joins a bounded queue (``ERC_ATTACK_MAX_QUEUE`` waiting behind ``ERC_ATTACK_CONCURRENCY``
running; beyond that 429 with ``Retry-After``) and awaits its result. Each of the
``ERC_ATTACK_CONCURRENCY`` dispatcher threads owns one attack-check child process (:mod:`.child`,
spawned on first use and again after a crash, through :func:`service.child.spawn`), hands it one
job at a time and resolves the request's future on the event loop. Attacks therefore never run on
the event loop, never take a slot of the prediction batcher, and never hold the server's GIL: a
child is a separate process at a lower CPU priority, and it dies with the server.

Every request has a deadline (``ERC_ATTACK_TIMEOUT_S``, queue wait included): a job whose deadline
passed while it queued is dropped unrun; a running one stops at its next forward pass; a child
that does not answer a few seconds after the deadline is terminated and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from service import metrics
from service.attack_check.child import CheckDone, CheckTimedOut, main
from service.child import ChildSetup, Failed, spawn
from service.errors import ServiceError, ServiceUnavailable, TooManyRequests
from service.settings import Settings

log = logging.getLogger(__name__)

GRACE_S = 5.0  # how long past its deadline a child may take to report before it is replaced


@dataclass
class _Job:
    payload: dict[str, Any]
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[dict[str, Any]]
    model: str
    enqueued: float = field(default_factory=time.monotonic)


class AttackPool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.concurrency = settings.attack_concurrency
        self.capacity = settings.attack_concurrency + settings.attack_max_queue
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._threads: list[threading.Thread] = []
        self._procs: dict[int, Any] = {}  # dispatcher index -> its child process
        self._stopping = False
        self._mean_s = 2.0  # running mean of a job's time in a child, for Retry-After

    async def run(self, payload: dict[str, Any], model: str) -> dict[str, Any]:
        """Queue one job and await the child's result (``ServiceError`` subclasses on refusal,
        timeout or failure)."""
        with self._lock:
            if self._stopping:
                raise ServiceUnavailable("the server is shutting down")
            if self._in_flight >= self.capacity:
                metrics.ATTACK_REQUESTS.labels(model=model, outcome="queue_full").inc()
                retry = math.ceil(self._mean_s * self._in_flight / self.concurrency)
                raise TooManyRequests(
                    f"{self._in_flight} attack checks are running or queued (limit {self.capacity}: "
                    f"ERC_ATTACK_CONCURRENCY + ERC_ATTACK_MAX_QUEUE); retry later",
                    max(1, min(retry, 60)),
                    code="attack_queue_full",
                )
            self._in_flight += 1
            metrics.ATTACK_IN_FLIGHT.set(self._in_flight)
            if not self._threads:
                self._start_threads()
        loop = asyncio.get_running_loop()
        job = _Job(
            payload, time.monotonic() + self.settings.attack_timeout_s, loop, loop.create_future(), model
        )
        self._jobs.put(job)
        return await job.future

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, answer the queued ones 503, end the children (a running job ends with its
        process) and join the dispatchers."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._resolve(job, ServiceUnavailable("the server is shutting down"))
        for _ in threads:
            self._jobs.put(None)
        for proc in list(self._procs.values()):
            _end(proc)
        for t in threads:
            t.join(timeout)

    # -- dispatcher threads ------------------------------------------------------------------------
    def _start_threads(self) -> None:
        for i in range(self.concurrency):
            t = threading.Thread(target=self._dispatch, args=(i,), name=f"attack-dispatch-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def _spawn(self, i: int) -> tuple[Any, Any]:
        """Start dispatcher ``i``'s child (from the dispatcher's own thread, which outlives it: the
        child dies with the thread that started it)."""
        s = self.settings
        how = ChildSetup(niceness=s.attack_niceness, sched_idle=s.attack_sched_idle, threads=s.attack_threads)
        proc, conn = spawn(main, how, name=f"attack-check-{i}", duplex=True)
        self._procs[i] = proc
        log.info("attack-check child %d started (pid %s)", i, proc.pid)
        return proc, conn

    def _dispatch(self, i: int) -> None:
        proc: Any = None
        conn: Any = None
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                try:
                    if proc is None or not proc.is_alive():
                        proc, conn = self._spawn(i)
                    outcome, sound = self._run(job, proc, conn)
                except Exception as exc:  # the dispatcher must survive any single job
                    log.exception("attack job failed in the dispatcher")
                    outcome, sound = ServiceError(f"attack check failed: {type(exc).__name__}: {exc}"), False
                if not sound and proc is not None:  # a child that died or went silent: a fresh one next
                    _end(proc)
                    proc = None
                self._resolve(job, outcome)
        finally:
            if proc is not None:
                with contextlib.suppress(OSError):
                    conn.send(None)
                _end(proc, wait=5)

    def _timeout(self, message: str) -> ServiceUnavailable:
        retry = str(max(1, math.ceil(self._mean_s)))
        return ServiceUnavailable(message, code="attack_timeout", headers={"Retry-After": retry})

    def _run(self, job: _Job, proc: Any, conn: Any) -> tuple[dict[str, Any] | ServiceError, bool]:
        """One job through the child: the result dict or the error to answer with, and whether the
        child is still sound (it answered)."""
        start = time.monotonic()
        metrics.ATTACK_QUEUE_WAIT.observe(start - job.enqueued)
        limit = self.settings.attack_timeout_s
        over = f"the attack check ran past its time limit of {limit:g} s (ERC_ATTACK_TIMEOUT_S)"
        if start >= job.deadline:
            waited = start - job.enqueued
            return self._timeout(f"the attack check waited {waited:.1f} s for a worker: {over}"), True
        conn.send({**job.payload, "deadline_in_s": job.deadline - start})
        while not conn.poll(0.1):
            if not proc.is_alive():
                return ServiceUnavailable(f"the attack worker exited (code {proc.exitcode}); retry"), False
            if time.monotonic() > job.deadline + GRACE_S:
                return self._timeout(over), False
        try:
            reply = conn.recv()
        except (EOFError, OSError):
            return ServiceUnavailable("the attack worker exited during the job; retry"), False
        seconds = time.monotonic() - start
        metrics.ATTACK_DURATION.labels(model=job.model).observe(seconds)
        self._mean_s = 0.8 * self._mean_s + 0.2 * seconds
        if isinstance(reply, CheckDone):
            result = reply.result
            result["queue_s"] = start - job.enqueued
            return result, True
        if isinstance(reply, CheckTimedOut):
            return self._timeout(f"{over}: fewer images, steps or restarts"), True
        if isinstance(reply, Failed):
            log.error("attack check failed: %s\n%s", reply.message, reply.traceback)
            return ServiceError(f"attack check failed: {reply.message}"), True
        return ServiceError(f"attack check failed: unexpected answer {type(reply).__name__}"), False

    def _resolve(self, job: _Job, outcome: dict[str, Any] | ServiceError) -> None:
        if isinstance(outcome, ServiceError):
            timeout = outcome.code == "attack_timeout"
            metrics.ATTACK_REQUESTS.labels(model=job.model, outcome="timeout" if timeout else "failed").inc()
        with self._lock:
            self._in_flight -= 1
            metrics.ATTACK_IN_FLIGHT.set(self._in_flight)

        def settle() -> None:
            if job.future.done():  # the request went away
                return
            if isinstance(outcome, ServiceError):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # the event loop closed (shutdown)
            job.loop.call_soon_threadsafe(settle)


def _end(proc: Any, wait: float = 0.0) -> None:
    """Stop a child process: wait ``wait`` seconds for it to exit by itself, then terminate it."""
    if wait:
        proc.join(wait)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
