"""``erc``: one command line for the whole project.

Each subcommand imports what it needs only when it runs, so ``erc --help`` is instant and the
serving process never imports training code it does not use.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("erc")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# -- train --------------------------------------------------------------------------------------
# CLI flag -> config key; every other key is reachable with --set section.field=value.
TRAIN_FLAGS: dict[str, tuple[str, type, str]] = {
    "dataset": ("data.dataset", str, "dataset name (erc data list)"),
    "data_dir": ("data.data_dir", str, "folder with the dataset files"),
    "train_subset": ("data.train_subset", int, "train on n images of the train split"),
    "eval_subset": ("data.eval_subset", int, "test images for the per-epoch accuracy"),
    "batch_size": ("data.batch_size", int, "global batch size"),
    "method": ("method.name", str, "er, er-minus, e-cla, vae-cla, none, madry, rse"),
    "arch": ("model.arch", str, "architecture name (default: the method family's for the dataset)"),
    "embed_dim": ("model.embed_dim", int, "embedding size k"),
    "width": ("model.width", float, "channel multiplier (0.25 = slim CPU variant)"),
    "prior": ("model.prior", str, "gaussian, uniform or cauchy"),
    "lr": ("optim.lr", float, "encoder / network learning rate"),
    "eps": ("adv.eps", float, "min-max training eps (default: the dataset's)"),
    "pgd_steps": ("adv.steps", int, "PGD steps per training batch"),
    "epochs": ("run.epochs", int, "number of epochs"),
    "seed": ("run.seed", int, "random seed"),
    "out": ("run.out_dir", str, "run directory"),
    "device": ("run.device", str, "auto, cpu, cuda, cuda:N"),
    "amp": ("run.amp", str, "none or bf16"),
    "eval_adv_n": ("run.eval_adv_n", int, "PGD-20 robust accuracy after each epoch on n test images"),
    "threads": ("run.threads", int, "torch CPU threads"),
}


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"erc: --set takes section.field=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import ConfigError, load_config
    from training.data import DataError
    from training.train import CONFIG, run_training

    overrides: dict[str, Any] = {}
    for flag, (key, _, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.channels_last:
        overrides["run.channels_last"] = True
    if args.compile:
        overrides["run.compile"] = True
    if args.no_progress:
        overrides["run.progress"] = False
    overrides.update(_parse_sets(args.set))
    config_path = args.config
    if args.resume:
        out = overrides.get("run.out_dir")
        if out is None and config_path is None:
            raise SystemExit("erc: --resume needs the run directory (--out DIR)")
        saved = Path(out or "") / CONFIG
        if out is not None and saved.exists():
            config_path = saved  # the run's own resolved config; flags given now still apply on top
    try:
        cfg = load_config(config_path, overrides)
        summary = run_training(cfg, resume=args.resume)
    except (ConfigError, DataError) as exc:
        raise SystemExit(f"erc: {exc}") from None
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line, from rank 0
        _out(json.dumps(summary))
    return 0


# -- eval ---------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from training.card import CardError
    from training.evaluate import AttackSpec, plot_curves
    from training.export import append_card_metrics, curve_metrics, evaluate_on_test, resolve_model

    try:
        loaded = resolve_model(args.model, args.store, args.device)
    except (FileNotFoundError, CardError) as exc:
        raise SystemExit(f"erc: {exc}") from None
    dataset = args.dataset or loaded.dataset
    if (args.loss == "dlr" and args.attack != "apgd") or (args.loss == "margin" and args.attack == "apgd"):
        raise SystemExit(f"erc: --loss {args.loss} does not go with --attack {args.attack}")
    spec = AttackSpec(
        name=args.attack,
        norm=args.norm,
        steps=1 if args.attack == "fgsm" else args.steps,
        restarts=args.restarts,
        alpha=args.alpha,
        loss=args.loss,
        random_start=args.attack != "fgsm",
        keep_best=not args.last_iterate,
    )
    eps = args.eps if args.eps is not None else [0.0, loaded.train_eps]
    curve = evaluate_on_test(
        loaded.model,
        dataset,
        eps,
        spec,
        n=args.n,
        seed=args.seed,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        model_name=loaded.name,
    )
    measured_on = f"{loaded.source} {loaded.path}"
    result = {
        "model": loaded.name,
        "source": loaded.source,
        "path": str(loaded.path),
        "weights_sha256": loaded.weights_sha256,
        "dataset": dataset,
        **curve.to_dict(),
        "metrics": curve_metrics(curve, dataset, measured_on, loaded.weights_sha256),
    }
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_curves([(loaded.name, curve)], out / "accuracy_vs_eps.png")
    if args.update_card:
        if loaded.source != "store" or dataset != loaded.dataset:
            raise SystemExit("erc: --update-card needs a store model evaluated on its own dataset")
        append_card_metrics(loaded.path, result["metrics"])
    _out(
        f"{loaded.name} on {dataset} test, n={curve.n}, {spec.describe()}, seed {curve.seed}, {curve.device}"
    )
    _out(f"{'eps':>8} {'accuracy':>9} {'95% CI':>17} {'seconds':>8}")
    for p in curve.points:
        lo, hi = 100 * p.ci95[0], 100 * p.ci95[1]
        _out(f"{p.eps:8.4f} {100 * p.accuracy:8.2f}% [{lo:6.2f}, {hi:6.2f}] {p.seconds:8.1f}")
    if out is not None:
        _out(f"wrote {out / 'eval.json'} and {out / 'accuracy_vs_eps.png'}")
    return 0


# -- export -------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_run

    path = export_run(
        args.run_dir,
        args.name,
        args.store,
        dtype=args.dtype,
        eval_n=args.eval_n,
        robust_eps=args.robust_eps,
        robust_steps=args.robust_steps,
        robust_restarts=args.robust_restarts,
        device=args.device,
        data_dir=args.data_dir,
        notes=args.notes,
        progress=not args.no_progress,
        typicality_fit_n=args.typicality_fit_n,
    )
    card = json.loads((path / "card.json").read_text())
    _out(f"exported {path} (sha256 {card['weights_sha256'][:16]}..., {card['weights_dtype']})")
    for m in card["metrics"]:
        _out(f"  {m['metric']} eps={m['eps']}: {100 * m['value']:.2f}% (n={m['n']})")
    return 0


# -- typicality ---------------------------------------------------------------------------------
def cmd_typicality(args: argparse.Namespace) -> int:
    from training.card import CardError
    from training.export import add_typicality, resolve_model
    from training.typicality import Typicality, evaluate

    try:
        loaded = resolve_model(args.model, args.store, args.device)
    except (FileNotFoundError, CardError) as exc:
        raise SystemExit(f"erc: {exc}") from None
    if loaded.source != "store":
        raise SystemExit("erc: typicality needs a store model (card.json)")
    if args.action == "fit":
        card = add_typicality(
            loaded.path, fit_n=args.fit_n, fpr=args.fpr, device=args.device, data_dir=args.data_dir
        )
        t = card.typicality
        _out(
            f"{card.name}: typicality fitted on {t['fit_n']} training embeddings; threshold "
            f"{t['threshold']:.4f} on the Mahalanobis distance flags {100 * t['calibration_flagged']:.1f} % "
            f"of {t['calibration_n']} held-out clean images (target {100 * t['fpr']:.0f} %)"
        )
        return 0
    from training.card import read_card

    card = read_card(loaded.path)
    if not card.typicality:
        raise SystemExit(
            f"erc: {card.name} has no typicality entry; run `erc typicality fit {card.name}` first"
        )
    result = evaluate(
        loaded.model,
        Typicality.from_dict(card.typicality),
        card.dataset,
        ood=args.ood or None,
        n=args.n,
        adv_n=args.adv_n,
        eps=args.eps,
        steps=args.steps,
        lambdas=args.lambdas,
        data_dir=args.data_dir,
    )
    result["model"] = card.name
    result["weights_sha256"] = card.weights_sha256
    from training.export import command_line

    result["command"] = command_line()
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    _out(text)
    return 0


# -- intrinsic-dim ------------------------------------------------------------------------------
def cmd_intrinsic_dim(args: argparse.Namespace) -> int:
    from training.data import load_split
    from training.intrinsic_dim import levina_bickel

    data = load_split(args.dataset, args.split, args.data_dir, n=args.n, seed=args.seed)
    x = data.as_float().reshape(len(data), -1)
    results = []
    for k1, k2 in args.k:
        r = levina_bickel(x, k1, k2, averaging=args.averaging, normalization=args.normalization)
        results.append(r.to_dict())
        where = f"{args.dataset} {args.split} n={r.n} k={k1}..{k2} {args.averaging}"
        _out(f"{where}: intrinsic dim {r.estimate:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"dataset": args.dataset, "seed": args.seed, "results": results}, indent=2)
        )
    return 0


def _k_range(text: str) -> tuple[int, int]:
    try:
        if "-" in text:
            a, b = text.split("-", 1)
            return int(a), int(b)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or K1-K2, got {text!r}") from None


# -- data ---------------------------------------------------------------------------------------
def cmd_data(args: argparse.Namespace) -> int:
    from training.data import DataError, describe, list_datasets

    if args.data_cmd == "list":
        for name in list_datasets():
            _out(name)
        return 0
    if args.data_cmd == "info":
        _out(json.dumps(describe(args.name, args.data_dir), indent=2, default=str))
        return 0
    from training.data.download import download

    try:
        paths = download(args.name, args.data_dir, mirror=args.mirror)
    except DataError as exc:
        raise SystemExit(f"erc: {exc}") from None
    for p in paths:
        _out(str(p))
    return 0


# -- audit --------------------------------------------------------------------------------------
def _attack_arg(text: str) -> tuple[str, dict[str, Any]]:
    """``pgd:steps=40,restarts=2`` -> ("pgd", {"steps": 40, "restarts": 2})."""
    import yaml

    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"attack parameters look like key=value, got {item!r}")
        params[key.strip()] = _scalar(value.strip(), yaml.safe_load)
    return name.strip(), params


def _scalar(text: str, fallback: Any) -> Any:
    """``40`` -> 40, ``1e-2`` -> 0.01 (YAML 1.1 would keep that a string), else YAML (``true``...)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return fallback(text)


def cmd_audit(args: argparse.Namespace) -> int:
    import threading

    import torch
    from tqdm import tqdm

    from service.audit.engine import AuditSpec, Progress, make_attack
    from service.audit.report import render
    from service.audit.runner import checks_cost, default_spec, run_audit
    from training.card import CardError
    from training.checkpoint import atomic_write_text
    from training.data import load_split
    from training.distributed import pick_device
    from training.export import resolve_model

    try:
        loaded = resolve_model(args.model, args.store, args.device)
    except (FileNotFoundError, CardError) as exc:
        raise SystemExit(f"erc: {exc}") from None
    base = default_spec(loaded.train_eps, args.norm)
    try:
        attacks = [make_attack(n, p, args.norm) for n, p in args.attack] if args.attack else base.attacks
    except ValueError as exc:
        raise SystemExit(f"erc: {exc}") from None
    spec = AuditSpec(
        eps=sorted(set(args.eps)) if args.eps else base.eps,
        attacks=attacks,
        norm=args.norm,
        precision=args.precision,
        compile=args.compile,
        seed=args.seed,
        checks=not args.no_checks,
        batch_size=args.batch_size,
    )
    dataset = args.dataset or loaded.dataset
    data = load_split(dataset, "test", args.data_dir, n=args.n, seed=args.data_seed)
    x, y = data.as_float(), data.labels
    progress = Progress(total=spec.work(len(x)) + checks_cost(spec, len(x)))
    done = threading.Event()

    def show() -> None:
        with tqdm(total=100, desc="audit", unit="%", disable=args.no_progress, dynamic_ncols=True) as bar:
            while not done.wait(0.5):
                snap = progress.snapshot()
                bar.n = int(100 * snap["fraction"])
                bar.set_postfix_str(snap["stage"])
                bar.refresh()
            bar.n = 100
            bar.refresh()

    shower = threading.Thread(target=show, daemon=True)
    shower.start()
    device = pick_device(args.device)
    info = {
        "name": loaded.name,
        "weights_sha256": loaded.weights_sha256,
        "source": loaded.source,
        "path": str(loaded.path),
        "dataset": loaded.dataset,
    }
    try:
        result = run_audit(
            loaded.model,
            x,
            y,
            spec,
            device=torch.device(device),
            model_info=info,
            data_info={"source": "test", "dataset": dataset, "n": len(x), "seed": args.data_seed},
            progress=progress,
        )
    finally:
        done.set()
        shower.join()
    out = Path(args.out)
    atomic_write_text(out / "audit.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "report.html", render(result))
    device_used = result["environment"]["device"]
    _out(f"{loaded.name} ({loaded.source}), {dataset} test n={len(x)}, {spec.norm}, {device_used}")
    _out(f"clean accuracy {100 * result['clean']['accuracy']:.2f}%")
    labels = [a["label"] for a in result["attacks"]]
    _out(f"{'eps':>8} {'union':>8} " + " ".join(f"{lb:>12}" for lb in labels))
    for row in result["per_eps"]:
        cells = " ".join(f"{100 * row['attacks'][lb]['accuracy']:11.2f}%" for lb in labels)
        _out(f"{row['eps']:8.4f} {100 * row['union']['accuracy']:7.2f}% {cells}")
    for c in result["checks"]:
        _out(f"  [{c['status'].upper():4}] {c['name']}: {c['message']}")
    _out(f"wrote {out / 'audit.json'} and {out / 'report.html'} ({result['timings_s']['total']:.1f} s)")
    return 0


# -- serve --------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import serve
    from service.settings import Settings

    overrides = {
        "host": args.host,
        "port": args.port,
        "model_store": args.store,
        "models": args.models,
        "default_model": args.default_model,
        "device": args.device,
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "torch_threads": args.torch_threads,
        "workers": args.workers,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    logging.getLogger().setLevel(settings.log_level.upper())
    serve(settings)
    return 0


# -- package ------------------------------------------------------------------------------------
def cmd_package(args: argparse.Namespace) -> int:
    from service.packaging import package_model
    from training.card import CardError

    try:
        path = package_model(args.store, args.name, version=args.version, out_dir=args.out)
    except (CardError, FileNotFoundError, RuntimeError) as exc:
        raise SystemExit(f"erc: {exc}") from None
    _out(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


# -- stack --------------------------------------------------------------------------------------
def cmd_stack(args: argparse.Namespace) -> int:
    from service.stack import start_stack

    stack = start_stack(Path(args.store), args.model)
    ts = stack.torchserve
    assert stack.api is not None and ts is not None
    _out(f"API          {stack.api.url}  (docs: {stack.api.url}/docs)")
    _out(f"TorchServe   {ts.inference_url}  management {ts.management_url}  metrics {ts.metrics_url}")
    _out(f"             keys: {ts.workdir / 'key_file.json'}")
    _out(f"Prometheus   {stack.prometheus_url}")
    _out(f"logs in {stack.workdir}; Ctrl-C stops the stack")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stack.stop()
    return 0


# -- list ---------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from training.data import list_datasets
    from training.methods import METHODS
    from training.models import list_models
    from training.priors import PRIORS

    _out("architectures: " + ", ".join(list_models()))
    _out("methods:")
    for name, m in METHODS.items():
        _out(f"  {name:9} {m.description}")
    _out("priors: " + ", ".join(f"{p.name} ({p.description})" for p in PRIORS.values()))
    _out("datasets: " + ", ".join(list_datasets()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="erc", description="ER-Classifier: train, evaluate, export and serve robust models."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (also under torchrun for DDP)")
    t.add_argument("--config", help="YAML config (sections data, model, optim, method, adv, run)")
    for flag, (key, typ, text) in TRAIN_FLAGS.items():
        t.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, help=f"{text} [{key}]")
    t.add_argument("--channels-last", action="store_true", help="NHWC memory format [run.channels_last]")
    t.add_argument("--compile", action="store_true", help="torch.compile the attacked network [run.compile]")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. method.clip=0.02",
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="robust accuracy under attack, JSON + PNG plot")
    e.add_argument("model", help="model name in the store, a model directory, or a run directory")
    e.add_argument("--store", default="model_store", help="model store folder")
    e.add_argument("--dataset", help="evaluate on this dataset's test split (default: the model's)")
    e.add_argument("--data-dir")
    e.add_argument(
        "--attack",
        default="pgd",
        choices=["pgd", "fgsm", "apgd", "square"],
        help="square: --steps are queries",
    )
    e.add_argument("--norm", default="linf", choices=["linf", "l2"])
    e.add_argument("--eps", type=_floats, help="comma-separated radii (default: 0 and the training eps)")
    e.add_argument("--steps", type=int, default=40)
    e.add_argument("--restarts", type=int, default=1)
    e.add_argument("--alpha", type=float, help="step size (default 2.5*eps/steps)")
    e.add_argument("--loss", default="ce", choices=["ce", "margin", "dlr"], help="dlr: APGD only")
    e.add_argument(
        "--last-iterate",
        action="store_true",
        help="judge only each restart's last iterate (the original PGD); default: any iterate counts",
    )
    e.add_argument("--n", type=int, help="number of test images (default: all)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="folder for eval.json and accuracy_vs_eps.png")
    e.add_argument("--update-card", action="store_true", help="add the figures to the store model's card")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser(
        "export", help="write model_store/NAME (encoder + classifier, safetensors + card.json)"
    )
    x.add_argument("run_dir")
    x.add_argument("--name", required=True)
    x.add_argument("--store", default="model_store")
    x.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    x.add_argument("--eval-n", type=int, help="test images for the card's accuracy (default: all)")
    x.add_argument(
        "--robust-steps", type=int, default=0, help="also PGD robust accuracy with this many steps"
    )
    x.add_argument("--robust-restarts", type=int, default=1)
    x.add_argument("--robust-eps", type=float, help="eps of that figure (default: the training eps)")
    x.add_argument("--data-dir")
    x.add_argument("--device", default="auto")
    x.add_argument("--notes", default="", help="free text for the card")
    x.add_argument(
        "--typicality-fit-n",
        type=int,
        default=10000,
        help="training images for the embedding typicality score (0: none; see erc typicality)",
    )
    x.add_argument("--no-progress", action="store_true")
    x.set_defaults(func=cmd_export)

    ty = sub.add_parser(
        "typicality", help="embedding typicality score: fit it into a store model's card, or measure it"
    )
    ty.add_argument("action", choices=["fit", "eval"])
    ty.add_argument("model", help="model name in the store or a model directory")
    ty.add_argument("--store", default="model_store")
    ty.add_argument("--data-dir")
    ty.add_argument("--device", default="auto")
    ty.add_argument("--fit-n", type=int, help="fit: training images (default: all)")
    ty.add_argument("--fpr", type=float, default=0.05, help="fit: false-positive rate of the threshold")
    ty.add_argument("--n", type=int, default=5000, help="eval: clean test images (the held-out half)")
    ty.add_argument("--adv-n", type=int, default=500, help="eval: images attacked per eps")
    ty.add_argument("--eps", type=_floats, default=[0.1, 0.2, 0.3], help="eval: attack radii")
    ty.add_argument("--steps", type=int, default=40, help="eval: attack steps")
    ty.add_argument("--lambdas", type=_floats, default=[0.1, 1.0, 10.0], help="eval: adaptive attack weights")
    ty.add_argument("--ood", default="fashion-mnist", help="eval: out-of-distribution test set ('' for none)")
    ty.add_argument("--out", help="eval: write the JSON here")
    ty.set_defaults(func=cmd_typicality)

    d = sub.add_parser("intrinsic-dim", help="Levina-Bickel MLE of a dataset's intrinsic dimension (Table 3)")
    d.add_argument("--dataset", default="mnist")
    d.add_argument("--split", default="train", choices=["train", "test"])
    d.add_argument("--data-dir")
    d.add_argument("--n", type=int, default=1000, help="sample size (the paper: 1000)")
    d.add_argument("--k", type=_k_range, action="append", help="K or K1-K2, repeatable (default 6-12)")
    d.add_argument("--averaging", default="levina", choices=["levina", "mackay"])
    d.add_argument("--normalization", default="k-2", choices=["k-2", "k-1"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", help="write the results as JSON here")
    d.set_defaults(func=cmd_intrinsic_dim)

    data = sub.add_parser("data", help="datasets: list, info, download")
    dsub = data.add_subparsers(dest="data_cmd", required=True, metavar="ACTION")
    dsub.add_parser("list", help="known datasets")
    info = dsub.add_parser("info", help="where a dataset is found and whether its files check out")
    info.add_argument("name")
    info.add_argument("--data-dir")
    dl = dsub.add_parser("download", help="fetch from the canonical source and verify checksums")
    dl.add_argument("name")
    dl.add_argument("--data-dir", required=True)
    dl.add_argument("--mirror", help="base URL to fetch the same file names from")
    data.set_defaults(func=cmd_data)

    au = sub.add_parser(
        "audit", help="robustness audit of a model: attacks, sanity checks, JSON + HTML report"
    )
    au.add_argument("model", help="model name in the store, a model directory, or a run directory")
    au.add_argument("--store", default="model_store")
    au.add_argument("--dataset", help="test split of this dataset (default: the model's)")
    au.add_argument("--data-dir")
    au.add_argument("--n", type=int, default=500, help="samples drawn from the test split")
    au.add_argument("--data-seed", type=int, default=0)
    au.add_argument("--eps", type=_floats, help="radii (default: 0, half and all of the training eps)")
    au.add_argument(
        "--attack",
        type=_attack_arg,
        action="append",
        help="NAME[:key=value,...], repeatable: fgsm, pgd, apgd, square, cw "
        "(default: fgsm, pgd:steps=40, apgd:steps=100)",
    )
    au.add_argument("--norm", default="linf", choices=["linf", "l2"])
    au.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="bf16 autocast, checked against fp32 on a subset (auto: bf16 on CUDA, fp32 on CPU)",
    )
    au.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.compile the attacked model (auto: on CUDA only)",
    )
    au.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    au.add_argument("--no-checks", action="store_true", help="skip the sanity checks")
    au.add_argument("--batch-size", type=int, default=256)
    au.add_argument("--device", default="auto")
    au.add_argument("--out", default="audit", help="folder for audit.json and report.html")
    au.add_argument("--no-progress", action="store_true")
    au.set_defaults(func=cmd_audit)

    sv = sub.add_parser("serve", help="serve the model store over HTTP (settings from ERC_* variables)")
    sv.add_argument("--host", help="bind address [ERC_HOST, default 127.0.0.1]")
    sv.add_argument("--port", type=int, help="TCP port [ERC_PORT, default 8080]")
    sv.add_argument("--store", help="model store folder [ERC_MODEL_STORE, default model_store]")
    sv.add_argument("--models", help="comma-separated model names to serve [ERC_MODELS, default all]")
    sv.add_argument("--default-model", help="model readiness depends on [ERC_DEFAULT_MODEL]")
    sv.add_argument("--device", help="cpu, cuda, cuda:N, auto [ERC_DEVICE, default cpu]")
    sv.add_argument(
        "--max-batch-size", type=int, help="rows per forward pass [ERC_MAX_BATCH_SIZE, default 32]"
    )
    sv.add_argument(
        "--batch-wait-ms", type=float, help="batch collection window [ERC_BATCH_WAIT_MS, default 5]"
    )
    sv.add_argument("--torch-threads", type=int, help="torch intra-op threads [ERC_TORCH_THREADS]")
    sv.add_argument("--workers", type=int, help="inference threads per model [ERC_WORKERS, default 1]")
    sv.set_defaults(func=cmd_serve)

    pk = sub.add_parser("package", help="build model_store/NAME.mar for TorchServe")
    pk.add_argument("name")
    pk.add_argument("--store", default="model_store")
    pk.add_argument("--version", default="1.0", help="TorchServe model version")
    pk.add_argument("--out", help="folder for the .mar (default: the store)")
    pk.set_defaults(func=cmd_package)

    st = sub.add_parser("stack", help="API + TorchServe + Prometheus on 127.0.0.1, without containers")
    st.add_argument("--store", default="model_store")
    st.add_argument("--model", default="mnist-er", help="the model TorchServe serves (the API serves all)")
    st.set_defaults(func=cmd_stack)

    ls = sub.add_parser("list", help="architectures, methods, priors and datasets")
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "intrinsic-dim" and not args.k:
        args.k = [(6, 12)]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
