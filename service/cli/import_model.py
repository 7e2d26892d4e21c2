"""``erc import``: a classifier you already have (torch.export ``.pt2``, TorchScript, ONNX) ->
``model_store/NAME``, checked before anything is written (:mod:`training.importing`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from service.cli._common import out


def register(sub: Any) -> None:
    im = sub.add_parser(
        "import",
        help="import a torch.export (.pt2), TorchScript or ONNX classifier into model_store/NAME",
        description="Checks the model (output shape, finite, deterministic, batch-size independent, "
        "input gradients for white-box formats, served = file), then writes model_store/NAME with a card "
        "measured on --dataset. Images reach the model as floats in [0, 1]; --mean/--std are applied "
        "by the service inside the model, so attacks work in pixel space.",
    )
    im.add_argument("model_file", help="model.pt2 (torch.export.save), a TorchScript file, model.onnx")
    im.add_argument("--name", required=True)
    im.add_argument("--input-shape", required=True, help="C,H,W of the images, e.g. 3,32,32")
    im.add_argument("--labels", help="label names in logit order, comma-separated")
    im.add_argument("--labels-file", help="label names in logit order, one per line")
    im.add_argument("--mean", help="per-channel mean the model expects its input normalized with")
    im.add_argument("--std", help="per-channel std (with --mean)")
    im.add_argument(
        "--embedding",
        help="the embedding: output:K (the K-th output of a .pt2 or TorchScript forward returning a "
        "tuple), or an ONNX output name; without it :embed and typicality are not available",
    )
    im.add_argument("--eps", type=float, help="l_inf radius of audits and :attack (default: the dataset's)")
    im.add_argument("--format", choices=["pt2", "torchscript", "onnx"], help="default: from the file name")
    im.add_argument(
        "--black-box",
        action="store_true",
        help="serve a .pt2/TorchScript model without gradients (query attacks only), e.g. one that masks "
        "gradients",
    )
    im.add_argument("--dataset", required=True, help="mnist, fashion_mnist, ..., or folder:DIR")
    im.add_argument("--data-dir")
    im.add_argument("--store", default="model_store")
    im.add_argument("--eval-n", type=int, default=1000, help="test images for the clean accuracy (0: all)")
    im.add_argument(
        "--typicality-fit-n", type=int, default=10000, help="training images for typicality (0: none)"
    )
    im.add_argument("--notes", default="")
    im.add_argument("--no-progress", action="store_true")
    im.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from service.cli._common import canonical_dataset
    from service.servable import check_servable
    from training.importing import ImportSpec, import_model, parse_floats, read_labels

    try:
        shape = [int(v) for v in args.input_shape.split(",")]
    except ValueError:
        raise SystemExit(f"erc: --input-shape must be C,H,W, got {args.input_shape!r}") from None
    spec = ImportSpec(
        path=Path(args.model_file),
        name=args.name,
        input_shape=shape,
        label_names=read_labels(args.labels, args.labels_file),
        dataset=canonical_dataset(args.dataset) or args.dataset,
        mean=parse_floats(args.mean, "mean"),
        std=parse_floats(args.std, "std"),
        embedding=args.embedding,
        eps=args.eps,
        format=args.format,
        black_box=args.black_box,
        eval_n=args.eval_n or None,
        typicality_fit_n=args.typicality_fit_n,
        data_dir=args.data_dir,
        notes=args.notes,
    )
    path = import_model(
        spec,
        args.store,
        verify=lambda d, ref: check_servable(d, reference=ref),
        progress=not args.no_progress,
    )
    card = json.loads((path / "card.json").read_text())
    caps = card["imported"]["capabilities"]
    out(f"imported {path} ({card['model_format']}, sha256 {card['weights_sha256'][:16]}...)")
    for c in card["imported"]["checks"]:
        out(f"  [PASS] {c['check']}")
    out(f"  white-box (input gradients): {'yes' if caps['gradients'] else 'no: ' + caps['why_no_gradients']}")
    out(f"  embedding: {card['embed_dim']}-d" if caps["embedding"] else "  embedding: none (no --embedding)")
    out(f"  typicality: {'fitted' if card.get('typicality') else 'none'}")
    for m in card["metrics"]:
        out(f"  {m['metric']} eps={m['eps']}: {100 * m['value']:.2f}% (n={m['n']})")
    for w in card.get("warnings") or []:
        out(f"  warning: {w}")
    return 0
