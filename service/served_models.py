"""The models this process serves: loaded at startup, verified, warmed, each with its batcher;
with the model repository on (service/repository.py), versions are loaded and unloaded while it
serves, as the deployment's record says.

A model that cannot be loaded (card unreadable, unknown architecture, weights whose sha256 does
not match the card, truncated weights) is refused with one clear log line and reported by
``/readyz`` with its reason; the other models keep serving.

Routing: ``models`` maps each name to its default version (what ``/v1/models/NAME`` reaches);
``versions`` holds every version this process has, keyed ``(name, store entry)``. Both are
replaced whole (never edited in place) by the one thread that changes them, so request handlers
read a consistent table without a lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service import metrics
from service.batching import Batcher, BatchStats
from service.errors import ModelNotReady, ModelNotServed
from service.inference import InferenceEngine
from service.settings import Settings
from training.card import CardError, ModelCard, headline, read_card
from training.devices import resolve_device
from training.formats import BLACK_BOX_NOTE

log = logging.getLogger(__name__)

PREFERRED_DEFAULT = "mnist-er"
# How long a version leaving routing waits for the requests that already hold it (in this process,
# and in every HTTP process when it runs in a model process) before its batcher stops.
DRAIN_S = 5.0


@dataclass
class ServedModel:
    name: str
    path: Path  # the store entry: model_store/ENTRY
    status: str = "loading"  # loading -> ready | failed; ready -> unloading
    reason: str | None = None
    card: ModelCard | None = None
    engine: InferenceEngine | None = None
    batcher: Batcher | None = None
    load_seconds: float | None = None
    # When the repository asked for this version (a failed load is retried after a newer ask).
    requested: float = 0.0

    @property
    def entry(self) -> str:
        return self.path.name

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
        if self.entry != self.name:
            out["entry"] = self.entry
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
    def __init__(self, settings: Settings, device: torch.device | None = None) -> None:
        """``device``: where the engines run (default: ``settings.device`` resolved); a registry
        that only mirrors another process's tables passes the CPU so that it never touches CUDA."""
        self.settings = settings
        self.models: dict[str, ServedModel] = {}  # name -> its default version (routing)
        self.versions: dict[tuple[str, str], ServedModel] = {}  # (name, entry) -> every version held
        self.unloaded: dict[str, str] = {}  # names unloaded by the repository -> why (for 404s)
        self.device = device if device is not None else resolve_device(settings.device)
        self.default_name: str | None = None
        self._started: list[ServedModel] = []

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
                failed = ServedModel(
                    missing, store / missing, status="failed", reason=f"no model {missing!r} in {store}"
                )
                self._publish(failed)
                log.error("model %s: not in the store %s", missing, store)
            found = [p for p in found if p.name in wanted]
        return found

    def load_all(self) -> None:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        for path in self.discover():
            self._started.append(self.load(path))
        ready = [n for n, m in self.models.items() if m.status == "ready"]
        self.default_name = self.settings.default_model or (
            PREFERRED_DEFAULT if PREFERRED_DEFAULT in self.models else (ready[0] if ready else None)
        )
        log.info(
            "serving %d model(s): %s; default %s", len(ready), ", ".join(ready) or "none", self.default_name
        )

    def startup_models(self) -> list[ServedModel]:
        """The store entries this process loaded (or failed to load) at start, under their own name."""
        return [m for m in self._started if self.versions.get((m.name, m.entry)) is m]

    def load(self, path: Path, name: str | None = None, *, publish: bool = True) -> ServedModel:
        """Load, verify, warm and start one store entry (as a version of ``name``, by default its
        own); any failure refuses the model, not the server. ``publish`` puts it in the routing
        table at once (startup); the repository publishes it itself once it is ready."""
        name = name or path.name
        served = ServedModel(name, path)
        if publish:
            self._publish(served)
        metrics.MODEL_READY.labels(model=name).set(0)
        t0 = time.perf_counter()
        try:
            served.card = read_card(path)
            self._start(served)
        except CardError as exc:
            served.status, served.reason = "failed", str(exc)
            log.error("model %s refused: %s", name, exc)
        except Exception as exc:  # any other failure to build, load or warm is also a refusal
            served.status, served.reason = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("model %s refused", name)
        if served.status == "failed":
            metrics.MODEL_LOAD_FAILURES.labels(model=name).inc()
            return served
        served.load_seconds = round(time.perf_counter() - t0, 3)
        metrics.MODEL_LOAD_DURATION.observe(served.load_seconds)
        card = served.card
        assert card is not None
        metrics.MODEL_READY.labels(model=name).set(1)
        log.info(
            "model %s ready in %.2f s (%s, %s, sha256 %s...)",
            name if served.entry == name else f"{name} (version {served.version}, entry {served.entry})",
            served.load_seconds,
            card.arch,
            self.device,
            card.weights_sha256[:12],
        )
        return served

    def _publish(self, served: ServedModel, *, default: bool = True) -> None:
        """Add ``served`` to the tables (replaced whole); as the default of its name unless told."""
        versions = dict(self.versions)
        versions[(served.name, served.entry)] = served
        self.versions = versions
        if default:
            models = dict(self.models)
            models[served.name] = served
            self.models = models
        self.unloaded.pop(served.name, None)
        self._count()

    def _count(self) -> None:
        metrics.MODELS_LOADED.set(sum(1 for m in self.versions.values() if m.ready))

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

    # -- the repository's changes (service/repository.py; one thread calls these) ---------------
    def apply(self, wanted: list[Any]) -> None:
        """Serve exactly the ``wanted`` records (service.repository.Record).

        Make before break: models no longer listed at all leave first; then the new versions load
        beside what is served and each default moves to its recorded version once that is ready
        (never to one that is not, while another is); only then do the versions no longer listed
        of a model that keeps others leave, so a version swap never leaves the name without a
        ready version while the new one loads (a last re-route covers a default that failed to
        load once the version it replaced is gone)."""
        want = {(r.name, r.entry): r for r in wanted}
        self._unload_unlisted(want, keep={name for name, _ in want})
        for key, record in want.items():
            held = self.versions.get(key)
            if held is not None and not (held.status == "failed" and record.updated > held.requested):
                continue
            fresh = self.load(self.settings.model_store / record.entry, record.name, publish=False)
            fresh.requested = record.updated
            self._publish(fresh, default=False)
        self._route(want)
        self._unload_unlisted(want)
        self._route(want)

    def _routed(self) -> None:
        """Called each time :meth:`apply` has re-routed (the model process pushes its table)."""

    def _draining(self, served: ServedModel, timeout_s: float) -> None:
        """Called by :meth:`unload` once ``served`` left routing, before its batcher drains: the
        model process waits here until no HTTP process holds a request for it."""

    def _unload_unlisted(self, want: dict[tuple[str, str], Any], keep: Collection[str] = ()) -> None:
        """Unload every version ``want`` does not list, except those of the names in ``keep``."""
        for key, served in list(self.versions.items()):
            if key not in want and served.status != "unloading" and served.name not in keep:
                self.unload(served, why=f"model {served.name!r} version {served.version} was unloaded")

    def _route(self, want: dict[tuple[str, str], Any]) -> None:
        """Point each name at its recorded default version once that is ready, or at once when the
        current default is not ready either (a first load: its failure then answers with the
        reason). Versions no longer wanted left the table in :meth:`unload`."""
        models = dict(self.models)
        for key, record in want.items():
            recorded, current = self.versions.get(key), models.get(record.name)
            if not record.is_default or recorded is None:
                continue
            if recorded.ready or current is None or not current.ready:
                models[record.name] = recorded
        self.models = models
        self._count()
        self._routed()

    def unload(self, served: ServedModel, *, why: str, drain_s: float = DRAIN_S) -> None:
        """Take ``served`` out of routing, let requests already on their way reach its batcher
        (up to ``drain_s``), finish what it holds, then stop it."""
        served.status = "unloading"
        key = (served.name, served.entry)
        if self.models.get(served.name) is served:
            models = dict(self.models)
            others = [
                v for k, v in self.versions.items() if k[0] == served.name and v is not served and v.ready
            ]
            if others:
                models[served.name] = others[0]
            else:
                models.pop(served.name)
                self.unloaded[served.name] = why
            self.models = models
        if served.batcher is not None:
            deadline = time.monotonic() + drain_s
            self._draining(served, drain_s)
            while served.batcher.busy and time.monotonic() < deadline:
                time.sleep(0.01)
            served.batcher.stop(reason=why)
        versions = dict(self.versions)
        versions.pop(key, None)
        self.versions = versions
        if not any(k[0] == served.name for k in versions):
            metrics.MODEL_READY.labels(model=served.name).set(0)
        self._count()
        log.info("model %s version %s (entry %s) unloaded", served.name, served.version, served.entry)

    def local_states(self) -> list[Any]:
        """Every version this process holds, as service.repository.LocalState rows."""
        from service.repository import LocalState

        return [
            LocalState(
                m.name,
                m.entry,
                m.version if m.card is not None else None,
                "ready" if m.ready else m.status,
                m.reason,
                m.load_seconds,
            )
            for m in self.versions.values()
        ]

    def stop(self, timeout: float = 10.0) -> None:
        for m in self.versions.values():
            if m.batcher is not None:
                m.batcher.stop(timeout)
            metrics.MODEL_READY.labels(model=m.name).set(0)

    # -- lookups --------------------------------------------------------------------------------
    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            if name in self.unloaded:
                raise ModelNotServed(
                    f"{self.unloaded[name]}; served: {', '.join(sorted(self.models)) or 'none'}"
                )
            raise ModelNotServed(
                f"no model named {name!r}; served: {', '.join(sorted(self.models)) or 'none'}"
            )
        if not model.ready:
            raise ModelNotReady(f"model {name!r} is not ready: {model.reason or model.status}")
        return model

    def get_version(self, name: str, version: str) -> ServedModel:
        """The loaded version ``version`` (sha256[:12]) of ``name``."""
        default = self.get(name)
        if default.version == version:
            return default
        for (n, _), m in self.versions.items():
            if n == name and m.version == version:
                if not m.ready:
                    raise ModelNotReady(
                        f"model {name!r} version {version} is not ready: {m.reason or m.status}"
                    )
                return m
        have = sorted({m.version for (n, _), m in self.versions.items() if n == name})
        raise ModelNotServed(
            f"model {name!r} has no version {version!r} (loaded: {', '.join(have)})", code="version_not_found"
        )

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
        elif self.default_name is not None and self.default_name in self.unloaded:
            # The default model was unloaded on purpose: ready while any model serves.
            ok = any(e["ready"] for e in detail.values())
        else:
            ok = self.default_name is not None and detail.get(self.default_name, {}).get("ready", False)
        return ok, detail


def _observe_batch(name: str, rows: int, waits: list[float], seconds: float) -> None:
    metrics.BATCH_SIZE.labels(model=name).observe(rows)
    metrics.INFERENCE_DURATION.labels(model=name).observe(seconds)
    hist = metrics.QUEUE_WAIT.labels(model=name)
    for w in waits:
        hist.observe(w)
