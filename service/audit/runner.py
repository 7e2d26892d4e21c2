"""One audit from start to end: attacks, sanity checks, the 2-D embedding view, and the record
of how it was made, with its progress reported as it goes. Shared by ``erc audit`` and the audit
child of the service's jobs (:mod:`service.audit.child`)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from service.audit.checks import run_checks
from service.audit.engine import AuditSpec, Engine, Progress, embedding_view, environment
from training.attacks import Suite, default_attacks, require_queries_only
from training.formats import capabilities_of

CHECKS_SUBSET = 200
PROGRESS_EVERY_S = 0.5  # how often ``on_progress`` hears of the audit's progress


def checks_cost(spec: AuditSpec, n: int) -> float:
    """Forward+backward passes the sanity checks add (on at most CHECKS_SUBSET samples)."""
    if not spec.checks:
        return 0.0
    m = min(n, CHECKS_SUBSET)
    iterative = [a for a in spec.attacks if a.spec.iterative]
    extra = 21.0  # large-eps PGD-20, zero-gradient pass
    if iterative:
        extra += 4 * iterative[0].cost + 5  # twice the steps and restarts; eps-0 run
    return m * extra


@contextlib.contextmanager
def _reporting(progress: Progress, on_progress: Callable[[dict[str, Any]], None] | None) -> Iterator[None]:
    """While the block runs: ``on_progress(progress.snapshot())`` every ``PROGRESS_EVERY_S`` from
    a thread of its own (nothing when None); no call after the block ends."""
    if on_progress is None:
        yield
        return
    done = threading.Event()

    def reporter() -> None:
        while not done.wait(PROGRESS_EVERY_S):
            on_progress(progress.snapshot())

    thread = threading.Thread(target=reporter, name="audit-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def run_audit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: AuditSpec,
    *,
    device: torch.device,
    model_info: dict[str, Any],
    data_info: dict[str, Any],
    progress: Progress | None = None,
    cancel: Any = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Audit ``model`` on ``x`` (``[N, C, H, W]`` in [0, 1]) with labels ``y``; returns a
    JSON-serializable record. ``on_progress``, when given, receives :meth:`Progress.snapshot` every
    ``PROGRESS_EVERY_S`` from a thread of its own while the audit runs (``erc audit``'s bar, the
    audit child's messages to its worker); it is not called after this returns or raises. A model
    without input gradients (black-box) takes query attacks only: anything else is refused."""
    caps = capabilities_of(model)
    require_queries_only(spec.suite, gradients=caps.gradients, why=caps.why_no_gradients)
    progress = progress or Progress(total=spec.work(len(x)) + checks_cost(spec, len(x)))
    with _reporting(progress, on_progress):
        started = time.time()
        t0 = time.perf_counter()
        engine = Engine(model, spec, device=device, cancel=cancel, progress=progress)
        result = engine.run(x, y)
        progress.add(0.0, "sanity checks")
        checks = run_checks(engine, x, y, result, subset=CHECKS_SUBSET) if spec.checks else []
        progress.add(0.0, "embedding view")
        view = None
        st = engine.state
        eps_pos = [e for e in result["eps"] if e > 0]
        if eps_pos and len(st.idx) and caps.embedding:
            # The worst examples of the whole suite at the largest eps (for a cascade, the last attack's
            # store holds every attack's findings).
            label = spec.attacks[-1].label
            m = min(spec.embed_points, len(st.idx))
            adv = st.adversarial[label][-1][:m]
            view = embedding_view(engine.model, x[st.idx[:m]], adv, y[st.idx[:m]], device, spec.batch_size)
            view["attack"] = spec.suite.label
            view["eps"] = eps_pos[-1]
        progress.add(progress.total, "done")
        result.update(
            model=model_info,
            data=data_info,
            settings={
                "eps": result["eps"],
                "norm": spec.norm,
                "suite": spec.suite.record(),
                "precision": spec.precision,
                "bf16_active": engine.bf16,
                "compile": spec.compile,
                "compiled": engine.compiled,
                "compile_error": engine.compile_error,
                "attacks": [{"name": a.name, "label": a.label, "params": a.kwargs} for a in spec.attacks],
                "checks": spec.checks,
                "batch_size": spec.batch_size,
            },
            seeds={"attacks": spec.seed, "data": data_info.get("seed")},
            # What the figures mean: a white-box worst case, or (no input gradients) an upper bound.
            threat_model={
                "white_box": caps.gradients,
                "note": caps.threat_note,
                "embedding": caps.embedding,
            },
            checks=[c.to_dict() for c in checks],
            embedding=view,
            environment=environment(device),
            started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        )
        result["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
        return result


def card_metrics(result: dict[str, Any], measured_on: str) -> list[dict[str, Any]]:
    """Card metric entries of an audit: the clean accuracy and, at every eps > 0, the worst case of
    the whole suite (for a preset, the figure it is known by), on the audited samples."""
    from training.evaluate import metric_entry

    data = result["data"]
    return [
        metric_entry(
            correct=row["union"]["robust"],
            n=row["union"]["n"],
            eps=row["eps"],
            attack={**result["settings"]["suite"], "norm": result["settings"]["norm"]},
            dataset=data.get("dataset", "upload"),
            seed=data.get("seed"),
            device=result["environment"]["device"],
            measured_on=measured_on,
            sha=result["model"].get("weights_sha256"),
        )
        for row in result["per_eps"]
    ]


def default_eps(train_eps: float) -> list[float]:
    """The audit's default radii: 0, half and all of the training eps."""
    return [0.0, round(train_eps / 2, 6), train_eps]


def default_spec(train_eps: float, norm: str = "linf", suite: Suite | None = None) -> AuditSpec:
    """An audit at the default radii with ``suite`` (default: :func:`default_attacks` for ``norm``)."""
    return AuditSpec(eps=default_eps(train_eps), suite=suite or default_attacks(norm))
