"""The shipped model through `erc import`: AutoAttack's standard suite on the store's ER entry and on
its torch.export (.pt2) and TorchScript exports, imported, on the same seeded test images.

    python bench/imported.py --n 100        # about 10 minutes a format on the 2-core CPU VM

Each format is exported from ``model_store/mnist-er`` (returning ``(logits, embedding)``), imported
with the same checks as ``erc import`` into a temporary store, loaded as the service loads it
(``training.formats.load_served``) and audited with the ``autoattack`` preset (the audit engine's
cascade, ``erc audit --attack autoattack``) at eps 0.3. The figures must agree to the image: the
formats serve the same network. The CI test does the same on 5 images
(tests/integration/test_import_models.py); this is the larger n. The last line is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import REPO, log, machine
from torch import nn

from service.audit.engine import AuditSpec
from service.audit.runner import run_audit
from training.attacks import build_attacks
from training.card import load_model
from training.data import load_split
from training.formats import load_served
from training.importing import ImportSpec, import_model


class WithEmbedding(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net.forward_features(x)
        return self.net.forward_head(z), z


def export(net: nn.Module, folder: Path) -> dict[str, Path]:
    model = WithEmbedding(net).eval()
    x = torch.rand(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1, max=1024)
    paths = {"pt2": folder / "er.pt2", "torchscript": folder / "er.ts"}
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}}), paths["pt2"])
    torch.jit.save(torch.jit.trace(model, x), str(paths["torchscript"]))
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="test images (seeded draw)")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net, card = load_model(REPO / "model_store" / "mnist-er")
    test = load_split("mnist", "test", n=args.n, seed=args.seed)
    x, y = test.as_float(), test.labels
    suite = build_attacks([("autoattack", {})])
    result: dict = {
        "machine": machine(),
        "settings": vars(args),
        "weights_sha256": card.weights_sha256,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        files, store = Path(tmp) / "files", Path(tmp) / "store"
        files.mkdir()
        models = {"store (er)": net}
        for fmt, path in export(net, files).items():
            spec = ImportSpec(
                path=path,
                name=f"er-{fmt}",
                input_shape=[1, 28, 28],
                label_names=card.label_names,
                dataset="mnist",
                eval_n=1000,
                typicality_fit_n=0,
                embedding="output:1",
                eps=args.eps,
            )
            models[fmt] = load_served(import_model(spec, store))[0]
        for name, model in models.items():
            t0 = time.perf_counter()
            spec = AuditSpec(eps=[0.0, args.eps], suite=suite, checks=False, batch_size=250)
            out = run_audit(model, x, y, spec, device=torch.device("cpu"), model_info={}, data_info={})
            union = out["per_eps"][1]["union"]
            result["runs"][name] = {**union, "clean": out["per_eps"][0]["union"]["accuracy"],
                                    "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            seconds = result["runs"][name]["seconds"]
            log(f"{name}: robust {union['accuracy']:.4f} (n={union['n']}) in {seconds} s")
    figures = {(r["robust"], r["n"]) for r in result["runs"].values()}
    result["agree"] = len(figures) == 1
    print(json.dumps(result))
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
