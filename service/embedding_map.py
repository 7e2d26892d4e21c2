"""The console's 2-D map of a model's test-set embeddings, built once per served model on first use.

``ERC_EMBEDDING_MAP_N`` test images (a fixed seeded draw) go through the model's own batcher in
batches of ``ERC_MAX_BATCH_SIZE`` (so building the map queues fairly behind predictions instead of
taking the model), and their embeddings are projected with the audit report's projection
(:func:`service.audit.engine.projection_2d`, PCA fitted on them). The answer carries the mean and
basis, so a client places any embedding ``z`` (from ``:predict?return_embedding=true`` or
``:attack``) at ``(z - mean) @ basis`` on the same map.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from service.audit.engine import projection_2d
from service.errors import NotFound
from service.served_models import ServedModel
from training.data import load_split
from training.errors import ErcError

log = logging.getLogger(__name__)

SEED = 0  # the draw of test images: fixed, so the map is the same on every server


class EmbeddingMaps:
    """Per-model maps, computed once (concurrent first requests wait for the same computation)."""

    def __init__(self, n: int, batch: int) -> None:
        self.n = n
        self.batch = batch
        self._maps: dict[str, dict[str, Any]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, model: ServedModel) -> dict[str, Any]:
        key = f"{model.name}@{model.version}"
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._maps:
                self._maps[key] = await self._build(model)
        return self._maps[key]

    async def _build(self, model: ServedModel) -> dict[str, Any]:
        assert model.card is not None and model.batcher is not None and model.engine is not None
        model.engine.require_embedding("the embedding map")
        card = model.card
        try:
            data = await run_in_threadpool(load_split, card.dataset, "test", n=self.n, seed=SEED)
        except (ErcError, OSError) as exc:
            raise NotFound(
                f"no embedding map for {model.name}: its test split ({card.dataset}) is not readable on "
                f"this server: {exc}",
                code="data_not_found",
            ) from None
        x = data.as_float()
        parts = []
        for start in range(0, len(x), self.batch):
            out = await model.batcher.submit(x[start : start + self.batch])
            parts.append(out.embedding)
        z = torch.from_numpy(np.concatenate(parts)).float()
        mean, basis, method = projection_2d(z)
        points = ((z - mean) @ basis).numpy()
        log.info("embedding map of %s: %d %s test images (%s)", model.name, len(x), card.dataset, method)
        return {
            "model": model.name,
            "model_version": model.version,
            "dataset": card.dataset,
            "split": "test",
            "n": len(x),
            "seed": SEED,
            "embed_dim": int(z.shape[1]),
            "method": method,
            "mean": mean[0].tolist(),
            "basis": basis.tolist(),
            "points": np.round(points, 4).tolist(),
            "labels": data.labels.tolist(),
            "label_names": card.label_names,
        }
