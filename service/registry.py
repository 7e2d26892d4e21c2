"""The models this process serves: loaded once at startup, verified, warmed, each with its batcher.

A model that cannot be loaded (card unreadable, unknown architecture, weights whose sha256 does
not match the card, truncated weights) is refused with one clear log line and reported by
``/readyz`` with its reason; the other models keep serving.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service import metrics
from service.batching import Batcher, BatchStats
from service.errors import ModelNotFound, ModelNotReady
from service.inference import InferenceEngine
from service.settings import Settings
from training.card import CardError, ModelCard, headline, read_card
from training.devices import resolve_device
from training.formats import BLACK_BOX_NOTE

log = logging.getLogger(__name__)

PREFERRED_DEFAULT = "mnist-er"


@dataclass
class ServedModel:
    name: str
    path: Path
    status: str = "loading"  # loading -> ready | failed
    reason: str | None = None
    card: ModelCard | None = None
    engine: InferenceEngine | None = None
    batcher: Batcher | None = None
    load_seconds: float | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.batcher is not None and self.batcher.running

    @property
    def version(self) -> str:
        """Model version = the first 12 hex digits of the weights' sha256: it names exact weights."""
        return self.card.weights_sha256[:12] if self.card else "unknown"

    @property
    def missing(self) -> dict[str, str]:
        """Optional parts of the card this model is served without, with the reason for each."""
        return dict(self.engine.missing) if self.engine is not None else {}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "ready": self.ready, "status": self.status}
        if self.reason:
            out["reason"] = self.reason
        if self.missing:
            out["missing"] = self.missing
        if self.card is not None:
            c = self.card
            out.update(
                version=self.version,
                arch=c.arch,
                dataset=c.dataset,
                method=c.method,
                input_shape=c.input_shape,
                embed_dim=c.embed_dim,
                prior=c.prior,
                labels=c.label_names,
                weights_sha256=c.weights_sha256,
                weights_dtype=c.weights_dtype,
                train_eps=c.train_eps,
                typicality=self.engine is not None and self.engine.typicality is not None,
                model_format=c.model_format,
                capabilities=c.capabilities,
                threat_model=None if c.white_box else BLACK_BOX_NOTE,
                warnings=c.warnings,
                headline=headline(c.metrics, c.train_eps),
                metrics=[
                    {k: m.get(k) for k in ("metric", "value", "ci95", "eps", "n", "attack", "measured_on")}
                    for m in c.metrics
                ],
            )
        return out


def _bucket_sizes(max_batch: int) -> list[int]:
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch]


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.device = resolve_device(settings.device)
        self.default_name: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def discover(self) -> list[Path]:
        store = self.settings.model_store
        if not store.is_dir():
            log.error("model store %s does not exist", store)
            return []
        try:
            # Every visible folder is a model; one without a readable card is refused with a reason.
            found = sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError as exc:
            log.error("model store %s is unreadable: %s", store, exc)
            return []
        wanted = self.settings.models
        if wanted:
            names = {p.name for p in found}
            for missing in sorted(set(wanted) - names):
                self.models[missing] = ServedModel(
                    missing, store / missing, status="failed", reason=f"no model {missing!r} in {store}"
                )
                log.error("model %s: not in the store %s", missing, store)
            found = [p for p in found if p.name in wanted]
        return found

    def load_all(self) -> None:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        for path in self.discover():
            self.load(path)
        ready = [n for n, m in self.models.items() if m.status == "ready"]
        self.default_name = self.settings.default_model or (
            PREFERRED_DEFAULT if PREFERRED_DEFAULT in self.models else (ready[0] if ready else None)
        )
        log.info(
            "serving %d model(s): %s; default %s", len(ready), ", ".join(ready) or "none", self.default_name
        )

    def load(self, path: Path) -> ServedModel:
        """Load, verify, warm and start one model; any failure refuses the model, not the server."""
        name = path.name
        served = ServedModel(name, path)
        self.models[name] = served
        metrics.MODEL_READY.labels(model=name).set(0)
        t0 = time.perf_counter()
        try:
            served.card = read_card(path)
            self._start(served)
        except CardError as exc:
            served.status, served.reason = "failed", str(exc)
            log.error("model %s refused: %s", name, exc)
            return served
        except Exception as exc:  # any other failure to build, load or warm is also a refusal
            served.status, served.reason = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("model %s refused", name)
            return served
        served.load_seconds = round(time.perf_counter() - t0, 3)
        card = served.card
        metrics.MODEL_READY.labels(model=name).set(1)
        log.info(
            "model %s ready in %.2f s (%s, %s, sha256 %s...)",
            name,
            served.load_seconds,
            card.arch,
            self.device,
            card.weights_sha256[:12],
        )
        return served

    def _start(self, served: ServedModel) -> None:
        s, name = self.settings, served.name
        engine = InferenceEngine.from_store(served.path, self.device)
        served.card = engine.card
        served.engine = engine
        for part, why in engine.missing.items():
            log.warning("model %s: served without %s: %s", name, part, why)
        if s.warmup:
            engine.warmup(_bucket_sizes(s.max_batch_size))

        def on_batch(rows: int, waits: list[float], seconds: float) -> None:
            _observe_batch(name, rows, waits, seconds)

        stats = BatchStats(on_batch=on_batch, on_depth=metrics.QUEUE_DEPTH.labels(model=name).set)
        served.batcher = Batcher(
            name,
            engine.forward,
            max_batch=s.max_batch_size,
            wait_s=s.batch_wait_ms / 1000.0,
            gap_s=s.batch_gap_ms / 1000.0,
            max_queue=s.max_queue,
            timeout_s=s.queue_timeout_s,
            workers=s.workers,
            stats=stats,
        )
        card = engine.card
        metrics.MODEL_INFO.labels(
            model=name,
            version=served.version,
            arch=card.arch,
            dataset=card.dataset,
            method=card.method,
            sha256=card.weights_sha256,
        ).set(1)
        served.batcher.start()
        served.status = "ready"

    def stop(self, timeout: float = 10.0) -> None:
        for m in self.models.values():
            if m.batcher is not None:
                m.batcher.stop(timeout)
            metrics.MODEL_READY.labels(model=m.name).set(0)

    # -- lookups --------------------------------------------------------------------------------
    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(
                f"no model named {name!r}; served: {', '.join(sorted(self.models)) or 'none'}"
            )
        if not model.ready:
            raise ModelNotReady(f"model {name!r} is not ready: {model.reason or model.status}")
        return model

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        detail = {}
        for name, m in self.models.items():
            entry: dict[str, Any] = {"ready": m.ready, "status": m.status}
            if m.reason:
                entry["reason"] = m.reason
            if m.missing:
                entry["missing"] = m.missing
            if m.batcher is not None and m.batcher.full:
                entry["ready"] = False
                entry["reason"] = f"queue full ({m.batcher.queued_rows} rows)"
            detail[name] = entry
        if self.settings.require_all_models:
            ok = bool(detail) and all(e["ready"] for e in detail.values())
        else:
            ok = self.default_name is not None and detail.get(self.default_name, {}).get("ready", False)
        return ok, detail


def _observe_batch(name: str, rows: int, waits: list[float], seconds: float) -> None:
    metrics.BATCH_SIZE.labels(model=name).observe(rows)
    metrics.INFERENCE_DURATION.labels(model=name).observe(seconds)
    hist = metrics.QUEUE_WAIT.labels(model=name)
    for w in waits:
        hist.observe(w)
