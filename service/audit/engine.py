"""The audit engine: every requested attack at every eps on the same samples, per-sample robust
flags, their union over attacks (a sample is robust only if every attack failed on it), 95 %
Wilson intervals, distortions of the successful attacks, timings, and everything needed to
reproduce the figures (settings, seeds, device, versions).

Eps levels are stacked into large batches with a per-sample eps (the attacks take eps as a
``[N]`` tensor), which keeps a GPU busy; on CUDA the attacks may run in bf16 autocast.
"""

from __future__ import annotations

import copy
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from training import __version__
from training.attacks import Attack, Suite, build_attacks, get_step
from training.evaluate import wilson_interval


class AuditCancelled(Exception):
    """Raised inside the engine when its cancel event is set."""


@dataclass
class AuditSpec:
    eps: list[float]
    suite: Suite  # the attacks (training.attacks.build_attacks); a preset's runs as a cascade
    precision: str = "auto"  # "fp32", "bf16" (autocast, checked against fp32), "auto": bf16 on CUDA only
    compile: str = "auto"  # "on", "off" or "auto" (on CUDA only): torch.compile the attacked model
    seed: int = 0
    checks: bool = True
    batch_size: int = 256
    embed_points: int = 300  # samples shown in the 2-D embedding view

    @property
    def attacks(self) -> tuple[Attack, ...]:
        return self.suite.attacks

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the audit job's record); :meth:`from_dict` builds the same spec again."""
        return {
            "eps": list(self.eps),
            "attacks": self.suite.requests(),
            "norm": self.norm,
            "precision": self.precision,
            "compile": self.compile,
            "seed": self.seed,
            "checks": self.checks,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditSpec:
        return cls(
            eps=list(d["eps"]),
            suite=build_attacks([(a["name"], a.get("params") or {}) for a in d["attacks"]], d["norm"]),
            precision=d["precision"],
            compile=d.get("compile", "auto"),
            seed=d["seed"],
            checks=d["checks"],
            batch_size=d.get("batch_size", 256),
        )

    @property
    def norm(self) -> str:
        return self.suite.norm

    def work(self, n: int) -> float:
        """Forward+backward passes the attacks cost on n samples at most (the audit bound; a cascade
        usually does far less, since later attacks only see the survivors)."""
        levels = sum(1 for e in self.eps if e > 0)
        return n * levels * self.suite.cost


@dataclass
class Progress:
    """Thread-safe progress: fraction done, elapsed, estimate of the rest."""

    total: float
    done: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    stage: str = "starting"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, work: float, stage: str | None = None) -> None:
        with self.lock:
            self.done = min(self.total, self.done + work)
            if stage:
                self.stage = stage

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            elapsed = time.perf_counter() - self.started
            frac = self.done / self.total if self.total else 1.0
            eta = elapsed / frac * (1 - frac) if frac > 0 else None
            return {
                "fraction": round(frac, 4),
                "elapsed_s": round(elapsed, 1),
                "remaining_s": None if eta is None else round(eta, 1),
                "stage": self.stage,
            }


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def predict_labels(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int
) -> torch.Tensor:
    """Predicted labels ``[N]`` of ``x`` in batches of ``batch`` (on x's device)."""
    with torch.no_grad():
        return torch.cat([model(x[s]).argmax(1) for s in _batches(len(x), batch)])


def summarize(flags: torch.Tensor) -> dict[str, Any]:
    k, n = int(flags.sum()), int(flags.numel())
    lo, hi = wilson_interval(k, n)
    return {
        "accuracy": round(k / n, 6) if n else None,
        "robust": k,
        "n": n,
        "ci95": [round(lo, 6), round(hi, 6)],
    }


def _distortion(d: torch.Tensor) -> dict[str, float | None]:
    if d.numel() == 0:
        return {"mean": None, "median": None, "max": None, "count": 0}
    return {
        "mean": round(float(d.mean()), 6),
        "median": round(float(d.median()), 6),
        "max": round(float(d.max()), 6),
        "count": int(d.numel()),
    }


@dataclass
class RunState:
    """What the sanity checks need from a run, beyond its summary."""

    clean: torch.Tensor  # [N] bool: correctly classified
    idx: torch.Tensor  # indices of the correctly classified samples (the ones attacked)
    flags: dict[str, dict[float, torch.Tensor]]  # attack label -> eps -> [N] robust flags
    union: dict[float, torch.Tensor]  # eps -> [N] robust against every attack
    adversarial: dict[str, torch.Tensor]  # attack label -> [levels, len(idx), C, H, W] (worst so far)
    ball_violation: float  # largest excess over eps or outside [0, 1] seen in any example


class _Meter:
    """The model as one batch of an attack sees it. Every forward pass credits the progress (a
    forward with gradients counts as one forward-backward pass per sample, one without as a third,
    like ``Attack.cost``), capped at the batch's planned work, so that progress moves with every
    attack step rather than every batch; and every forward pass polls the cancel event."""

    def __init__(self, engine: Engine, budget: float, stage: str) -> None:
        self.engine, self.left, self.stage = engine, budget, stage

    def _credit(self, work: float) -> None:
        work = min(work, self.left)
        self.left -= work
        if self.engine.progress is not None:
            self.engine.progress.add(work, self.stage)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.engine._check_cancel()
        self._credit(len(x) * (1.0 if torch.is_grad_enabled() else 1 / 3))
        return self.engine.forward(x)

    def finish(self) -> None:
        """Credit what the batch planned and did not spend (early stops, cheaper steps)."""
        self._credit(self.left)


class Engine:
    """Runs one audit on one device. ``cancel`` is polled at every forward pass of an attack."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: AuditSpec,
        *,
        device: torch.device,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> None:
        # The attacks run on a channels-last copy (NHWC convolutions: about 1.2x faster forward and
        # backward on CPU here, faster on GPU too); the caller's model is not touched.
        model = copy.deepcopy(model).to(device).eval()
        self.model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.spec = spec
        self.device = device
        self.cancel = cancel or threading.Event()
        self.step = get_step(spec.norm)
        self.progress = progress
        if spec.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be fp32, bf16 or auto, got {spec.precision!r}")
        self.bf16 = spec.precision == "bf16" or (spec.precision == "auto" and device.type == "cuda")
        if spec.compile not in ("on", "off", "auto"):
            raise ValueError(f"compile must be on, off or auto, got {spec.compile!r}")
        self.compiled = spec.compile == "on" or (spec.compile == "auto" and device.type == "cuda")
        # dynamic: early stop shrinks the batch at every step; one graph serves every size.
        self._compiled = torch.compile(self.model, dynamic=True) if self.compiled else None
        self.compile_error: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The attacked model: compiled when asked for; a model or host torch.compile cannot handle
        falls back to eager once, and the audit records why."""
        if self._compiled is not None:
            try:
                out: torch.Tensor = self._compiled(x)
                return out
            except Exception as exc:  # any compiler failure means: run eager
                self._compiled, self.compiled = None, False
                self.compile_error = f"{type(exc).__name__}: {str(exc)[:300]}"
        out = self.model(x)
        return out

    def _credit(self, work: float, stage: str) -> None:
        if self.progress is not None and work > 0:
            self.progress.add(work, stage)

    def _autocast(self, bf16: bool) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise AuditCancelled("audit cancelled")

    def attack_stacked(
        self,
        attack: Attack,
        x: torch.Tensor,
        y: torch.Tensor,
        eps_levels: list[float],
        seed: int,
        bf16: bool | None = None,
    ) -> torch.Tensor:
        """Adversarial examples for every (eps, sample) pair, ``[L, N, C, H, W]``: the eps levels
        are stacked into batches with a per-sample eps."""
        levels = torch.tensor(eps_levels, dtype=x.dtype)
        n = len(x)
        xs = x.repeat(len(eps_levels), 1, 1, 1)
        ys = y.repeat(len(eps_levels))
        es = levels.repeat_interleave(n)
        return self.attack_pairs(attack, xs, ys, es, seed, bf16).view(len(eps_levels), n, *x.shape[1:])

    def attack_pairs(
        self,
        attack: Attack,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: torch.Tensor,
        seed: int,
        bf16: bool | None = None,
    ) -> torch.Tensor:
        """Adversarial examples ``[M, C, H, W]`` for ``M`` (image, label, eps) triples, in batches
        with a per-sample eps (``eps`` is ``[M]``)."""
        out = torch.empty_like(x)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        use_bf16 = self.bf16 if bf16 is None else bf16
        for s in _batches(len(x), self.spec.batch_size):
            self._check_cancel()
            xb = x[s].to(self.device).contiguous(memory_format=torch.channels_last)
            yb, eb = y[s].to(self.device), eps[s].to(self.device)
            meter = _Meter(self, (s.stop - s.start) * attack.cost, attack.label)
            with self._autocast(use_bf16):
                out[s] = attack(meter, xb, yb, eps=eb, generator=gen).float().cpu()
            meter.finish()
        return out

    def run(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """x: ``[N, C, H, W]`` floats in [0, 1] (CPU), y: ``[N]``. Returns the audit result.

        Only correctly classified samples are attacked. Without a cascade every attack attacks all
        of them at every eps (each attack's figure is its own); in a cascade (a preset) an attack
        only attacks the (eps, sample) pairs every earlier one failed on, so its figure is the
        worst case of itself and the attacks before it. The union is the figure either way.
        """
        spec = self.spec
        t_start = time.perf_counter()
        model = self.model
        pred = predict_labels(model, x.to(self.device), spec.batch_size).cpu()
        clean = pred == y
        eps_all = sorted({float(e) for e in spec.eps})
        eps_pos = [e for e in eps_all if e > 0]
        result: dict[str, Any] = {
            "clean": summarize(clean),
            "eps": eps_all,
            "attacks": [],
            "per_eps": [],
            "suite": {"label": spec.suite.label, "preset": spec.suite.preset, "cascade": spec.suite.cascade},
        }
        union = {e: clean.clone() for e in eps_all}
        flags: dict[str, dict[float, torch.Tensor]] = {}
        dist: dict[str, dict[float, dict[str, Any]]] = {}
        timings: dict[str, float] = {}
        ball_violation = 0.0
        idx = clean.nonzero().squeeze(1)  # only correctly classified samples can be "robust"
        xc, yc = x[idx], y[idx]
        levels = len(eps_pos)
        # Per (eps level, attacked sample): the example that broke it, else the latest attempt.
        worst = xc.unsqueeze(0).repeat(levels, *([1] * xc.ndim))
        adv_store: dict[str, torch.Tensor] = {}
        for k, attack in enumerate(spec.attacks):
            t0 = time.perf_counter()
            d_att: dict[float, dict[str, Any]] = {}
            pairs = torch.zeros(levels, len(idx), dtype=torch.bool)
            for li, e in enumerate(eps_pos):
                pairs[li] = union[e][idx] if spec.suite.cascade else True
            f_att = {e: (union[e] if spec.suite.cascade else clean).clone() for e in eps_all}
            todo = pairs.nonzero()  # [M, 2]: (level, sample)
            if len(todo):
                li_t, si_t = todo[:, 0], todo[:, 1]
                eps_t = torch.tensor(eps_pos, dtype=x.dtype)[li_t]
                adv = self.attack_pairs(attack, xc[si_t], yc[si_t], eps_t, spec.seed + 1000 * k)
                d = self.step.distance(adv, xc[si_t])
                ball_violation = max(
                    ball_violation, float((d - eps_t).max()), float(-adv.min()), float(adv.max() - 1)
                )
                survived = predict_labels(model, adv.to(self.device), spec.batch_size).cpu() == yc[si_t]
                # Keep the first example that broke a pair; replace only attempts that did not.
                unbroken = torch.stack([union[e][idx] for e in eps_pos])[li_t, si_t]
                worst[li_t[unbroken], si_t[unbroken]] = adv[unbroken]
                for li, e in enumerate(eps_pos):
                    mine = li_t == li
                    f_att[e][idx[si_t[mine]]] = survived[mine]
                    union[e] &= f_att[e]
                    d_att[e] = _distortion(d[mine][~survived[mine]])
            # Work planned for pairs this attack did not attack (misclassified samples, pairs an
            # earlier attack of a cascade broke) is done too: progress and ETA stay true.
            self._credit((len(x) * levels - len(todo)) * attack.cost, attack.label)
            adv_store[attack.label] = worst.clone()
            timings[attack.label] = round(time.perf_counter() - t0, 3)
            flags[attack.label] = f_att
            dist[attack.label] = d_att
            result["attacks"].append(
                {
                    "name": attack.name,
                    "label": attack.label,
                    "params": attack.kwargs,
                    "cost_per_image": attack.cost,
                    "attacked_pairs": len(todo),
                    "seconds": timings[attack.label],
                }
            )
        for e in eps_all:
            row: dict[str, Any] = {"eps": e, "union": summarize(union[e]), "attacks": {}}
            for label, f_att in flags.items():
                row["attacks"][label] = {**summarize(f_att[e]), "distortion": dist[label].get(e)}
            result["per_eps"].append(row)
        result["timings_s"] = {**timings, "attacks_total": round(time.perf_counter() - t_start, 3)}
        self.state = RunState(clean, idx, flags, union, adv_store, ball_violation)
        return result


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": str(torch.__version__),
        "erc": __version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def embedding_view(
    model: Any, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int
) -> dict[str, Any]:
    """Clean and adversarial embeddings projected to 2-D with PCA fitted on the clean ones."""
    with torch.no_grad():
        z = torch.cat(
            [model.forward_features(x[s].to(device)).float().cpu() for s in _batches(len(x), batch)]
        )
        za = torch.cat(
            [model.forward_features(x_adv[s].to(device)).float().cpu() for s in _batches(len(x), batch)]
        )
        pa = torch.cat([model(x_adv[s].to(device)).argmax(1).cpu() for s in _batches(len(x), batch)])
    mean, basis, method = projection_2d(z)
    return {
        "clean": ((z - mean) @ basis).tolist(),
        "adversarial": ((za - mean) @ basis).tolist(),
        "labels": y.tolist(),
        "adversarial_pred": pa.tolist(),
        "method": method,
        "embed_dim": int(z.shape[1]),
    }


def projection_2d(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The 2-D view of embeddings ``z`` ``[N, k]``: ``(mean [1, k], basis [k, 2], method)``, a point
    ``p`` lands at ``(p - mean) @ basis``. PCA fitted on ``z`` (the first two principal axes); an
    embedding of at most two dimensions is shown as it is. Shared by the audit report and the
    console's embedding map, so both draw the same picture."""
    mean = z.mean(0, keepdim=True)
    if z.shape[1] <= 2:
        basis = torch.eye(z.shape[1])[:, :2]
    else:
        _, _, v = torch.linalg.svd(z - mean, full_matrices=False)
        basis = v[:2].T
    if basis.shape[1] < 2:  # a 1-d embedding, or one clean point (one component): pad to two axes
        basis = torch.cat([basis, torch.zeros(basis.shape[0], 2 - basis.shape[1])], dim=1)
    return mean, basis, "identity" if z.shape[1] <= 2 else "PCA fitted on the clean embeddings"


def zero_gradient_share(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int
) -> float:
    """Share of samples whose cross-entropy input gradient is exactly zero (shattered gradients)."""
    zero = 0
    for s in _batches(len(x), batch):
        xb = x[s].to(device).requires_grad_(True)
        loss = F.cross_entropy(model(xb).float(), y[s].to(device), reduction="sum")
        (g,) = torch.autograd.grad(loss, xb)
        zero += int((g.flatten(1).abs().amax(1) == 0).sum())
    return zero / max(len(x), 1)
