"""Bring your own model (issue 27): classifiers made here, exported to torch.export (.pt2),
TorchScript and ONNX, imported with ``erc import``'s library call, served, attacked and audited.

The models are made in the test: a small CNN with its normalization inside ``forward`` (trained for
a few seconds on MNIST), one with BatchNorm (eval mode), and the shipped ER model
(``model_store/mnist-er``) exported to all three formats. Bad files are refused at import with one
line naming the check, and leave no store entry behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.audit.engine import AuditSpec
from service.audit.runner import run_audit
from service.inference import InferenceEngine
from service.servable import check_servable
from training.attacks import AttackError, Suite, build_attacks
from training.card import load_model
from training.data import load_split
from training.formats import ModelFileError, load_served
from training.importing import ImportSpec, import_model

LABELS = [str(i) for i in range(10)]
REPO = Path(__file__).resolve().parents[2]


class SmallCNN(nn.Module):
    """Normalization inside forward; returns (logits, features) so the features can be the embedding."""

    def __init__(self, batchnorm: bool = False, classes: int = 10) -> None:
        super().__init__()
        norm: nn.Module = nn.BatchNorm2d(8) if batchnorm else nn.Identity()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 5, stride=2), norm, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 32), nn.ReLU()
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.features((x - 0.1307) / 0.3081)
        return self.head(z), z


class LogitsOnly(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


class ERWithEmbedding(nn.Module):
    """The shipped ER network returning (logits, embedding) for export."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net.forward_features(x)
        return self.net.forward_head(z), z


def export_all(model: nn.Module, folder: Path, stem: str) -> dict[str, Path]:
    model = model.eval()
    x = torch.rand(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1, max=1024)
    paths = {
        "pt2": folder / f"{stem}.pt2",
        "torchscript": folder / f"{stem}.ts",
        "onnx": folder / f"{stem}.onnx",
    }
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}}), paths["pt2"])
    torch.jit.save(torch.jit.trace(model, x), str(paths["torchscript"]))
    outs = ["logits", "features"] if isinstance(model(x), tuple) else ["logits"]
    torch.onnx.export(
        model,
        (x,),
        str(paths["onnx"]),
        input_names=["input"],
        output_names=outs,
        dynamic_shapes={"x": {0: batch}},
        verbose=False,
    )
    return paths


def do_import(store: Path, path: Path, name: str, **kw) -> Path:
    spec = ImportSpec(
        path=path,
        name=name,
        input_shape=[1, 28, 28],
        label_names=LABELS,
        dataset="mnist",
        eval_n=100,
        typicality_fit_n=kw.pop("typicality_fit_n", 500),
        **kw,
    )
    return import_model(spec, store, verify=lambda d, ref: check_servable(d, reference=ref))


@pytest.fixture(scope="module")
def small_cnn() -> SmallCNN:
    train = load_split("mnist", "train", n=3000, seed=0)
    x, y = train.as_float(), train.labels
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for i in range(0, len(x), 100):
            loss = nn.functional.cross_entropy(model(x[i : i + 100])[0], y[i : i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def shipped() -> nn.Module:
    net, _ = load_model(REPO / "model_store" / "mnist-er")
    return net


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, small_cnn: SmallCNN, shipped: nn.Module) -> Path:
    root = tmp_path_factory.mktemp("byom")
    store = root / "store"
    files = root / "files"
    files.mkdir()
    cnn = export_all(small_cnn, files, "cnn")
    torch.manual_seed(1)
    bn = export_all(LogitsOnly(SmallCNN(batchnorm=True)), files, "bn")
    er = export_all(ERWithEmbedding(shipped), files, "er")
    for fmt, path in cnn.items():
        emb = "features" if fmt == "onnx" else "output:1"
        do_import(store, path, f"cnn-{fmt}", embedding=emb)
    do_import(store, bn["pt2"], "bn-pt2")
    for fmt, path in er.items():
        emb = "features" if fmt == "onnx" else "output:1"
        do_import(store, path, f"er-{fmt}", embedding=emb, eps=0.3, typicality_fit_n=0)
    return store


def _images(n: int = 8, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_split("mnist", "test", n=n, seed=seed)
    return test.as_float(), test.labels


def test_served_models_answer_as_the_eager_model(
    store: Path, small_cnn: SmallCNN, shipped: nn.Module
) -> None:
    x, _ = _images()
    with torch.no_grad():
        want = {"cnn": small_cnn(x)[0], "er": shipped(x)}
    for stem in ("cnn", "er"):
        for fmt in ("pt2", "torchscript", "onnx"):
            engine = InferenceEngine.from_store(store / f"{stem}-{fmt}")
            out = engine.forward(x)
            assert out.label.tolist() == want[stem].argmax(1).tolist(), (stem, fmt)
            np.testing.assert_allclose(out.logits, want[stem].numpy(), atol=1e-4, rtol=1e-4)
            assert out.embedding.shape[1] > 0
    card = json.loads((store / "cnn-pt2" / "card.json").read_text())
    assert card["model_format"] == "pt2" and card["imported"]["capabilities"]["gradients"] is True
    assert card["typicality"] and card["metrics"][0]["value"] > 0.8, card["metrics"]
    onnx = json.loads((store / "cnn-onnx" / "card.json").read_text())
    assert onnx["imported"]["capabilities"]["gradients"] is False
    assert any("black-box: an upper bound, not a worst case" in w for w in onnx["warnings"])
    bn = InferenceEngine.from_store(store / "bn-pt2")
    assert not bn.capabilities.embedding and bn.forward(x).embedding.shape == (8, 0)


def test_the_server_serves_imported_models(store: Path, start_server_fn, tmp_path: Path) -> None:
    import httpx

    from tests.conftest import png_bytes

    x, _ = _images(2)
    png = png_bytes((x[0, 0].numpy() * 255).round().astype(np.uint8))
    srv = start_server_fn(store, tmp_path, ERC_MODELS="cnn-pt2,cnn-onnx,bn-pt2")
    try:
        base = srv.url
        with httpx.Client(base_url=base, timeout=60) as c:
            models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
            assert models["cnn-onnx"]["threat_model"] == "black-box: an upper bound, not a worst case"
            assert models["cnn-pt2"]["capabilities"]["gradients"] is True
            r = c.post(
                "/v1/models/cnn-pt2:predict?return_embedding=true",
                content=png,
                headers={"content-type": "image/png"},
            )
            assert r.status_code == 200, r.text
            pred = r.json()["predictions"][0]
            assert len(pred["embedding"]) == 32 and "typicality" in pred
            v2 = c.get("/v2/models/bn-pt2").json()
            assert "embedding" not in [o["name"] for o in v2["outputs"]]
            r = c.post("/v1/models/bn-pt2:embed", content=png, headers={"content-type": "image/png"})
            assert r.status_code == 422 and "embedding" in r.json()["error"]["message"], r.text
            r = c.post("/v1/models/cnn-onnx:attack", content=png, headers={"content-type": "image/png"})
            assert r.status_code == 422 and r.json()["error"]["code"] == "black_box_model", r.text
    finally:
        assert srv.stop(), srv.log.read_text()[-3000:]


def _audit(model: nn.Module, suite: Suite, n: int = 20, eps: float = 0.3) -> dict:
    x, y = _images(n, seed=5)
    spec = AuditSpec(eps=[0.0, eps], suite=suite, checks=False, batch_size=64)
    return run_audit(model, x, y, spec, device=torch.device("cpu"), model_info={}, data_info={})


def test_shipped_model_exports_give_the_store_figure(store: Path) -> None:
    """The `autoattack` preset (AutoAttack's standard suite, full budgets) at eps 0.3 on the same
    5 seeded test images: the .pt2 and TorchScript exports of the shipped model give the store
    entry's figure (n is small: 100 images take about 10 minutes on 2 cores; bench/ for more)."""
    suite = build_attacks([("autoattack", {})])
    figures = {}
    for name in ("er-pt2", "er-torchscript"):
        model, _ = load_served(store / name)
        figures[name] = _audit(model, suite, n=5)["per_eps"][1]["union"]
    er, _ = load_served(REPO / "model_store" / "mnist-er")
    figures["store"] = _audit(er, suite, n=5)["per_eps"][1]["union"]
    assert len({(f["robust"], f["n"]) for f in figures.values()}) == 1, figures
    assert figures["store"]["n"] == 5


def test_an_imported_model_matches_torchattacks(store: Path, cut_autoattack_fn) -> None:
    """The cut AutoAttack cascade (as tests/unit/training/test_attacks_parity.py) on an imported
    .pt2 model against torchattacks' own four attacks on the same model."""
    model, _ = load_served(store / "cnn-pt2")
    x, y = _images(40, seed=7)
    ours, ref = cut_autoattack_fn(model, x, y, eps=0.1, steps=10, queries=200)
    assert abs(ours - ref) <= 0.015 + 1 / len(y), (ours, ref)


def test_onnx_is_audited_black_box_and_white_box_attacks_are_refused(store: Path) -> None:
    model, _ = load_served(store / "cnn-onnx")
    result = _audit(model, build_attacks([("square", {"queries": 30})]), n=10, eps=0.1)
    assert result["threat_model"]["note"] == "black-box: an upper bound, not a worst case"
    with pytest.raises(AttackError, match="need input gradients"):
        _audit(model, build_attacks([("pgd", {"steps": 2})]), n=4)


class Rounding(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 8) / 8)[0]


class NaNs(LogitsOnly):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0] * float("nan")


class Dropout(LogitsOnly):
    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.net(x)[0])


def _pt2(model: nn.Module, path: Path, train: bool = False) -> Path:
    model.train(train)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(
        torch.export.export(model, (torch.rand(2, 1, 28, 28),), dynamic_shapes={"x": {0: batch}}), path
    )
    return path


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("truncated", "not a readable torch.export program"),
        ("onnx_as_pt2", "not a readable torch.export program"),
        ("wrong_shape", "check output_shape"),
        ("nan", "check finite"),
        ("dropout", "check deterministic"),
        ("static_batch", "check input_shape.*static batch dimension"),
        ("rounding", "check gradients"),
    ],
)
def test_bad_model_files_are_refused_without_a_store_entry(
    case: str, fragment: str, tmp_path: Path, small_cnn: SmallCNN, store: Path
) -> None:
    path = tmp_path / "model.pt2"
    torch.manual_seed(0)
    if case == "truncated":
        data = (store / "cnn-pt2" / "model.pt2").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "onnx_as_pt2":
        path.write_bytes((store / "cnn-onnx" / "model.onnx").read_bytes())
    elif case == "wrong_shape":
        _pt2(LogitsOnly(SmallCNN(classes=5)), path)
    elif case == "nan":
        _pt2(NaNs(small_cnn), path)
    elif case == "dropout":
        _pt2(Dropout(small_cnn), path, train=True)
    elif case == "static_batch":
        torch.export.save(torch.export.export(LogitsOnly(small_cnn), (torch.rand(4, 1, 28, 28),)), path)
    elif case == "rounding":
        _pt2(Rounding(small_cnn), path)
    target = tmp_path / "store"
    with pytest.raises(ModelFileError, match=fragment) as info:
        do_import(target, path, "bad")
    assert "\n" not in str(info.value)
    assert not target.exists() or list(target.iterdir()) == []
    if case == "rounding":  # imported --black-box it is served, and audited with query attacks
        entry = do_import(target, path, "masked", black_box=True, typicality_fit_n=0)
        model, card = load_served(entry)
        assert not card.white_box and not model.capabilities.gradients


def test_the_release_gate_exits_nonzero_below_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli.audit import GATE_FAILED, release_gate

    assert release_gate({"accuracy": 0.80, "eps": 0.3, "n": 20}, 0.85) == GATE_FAILED
    assert (
        capsys.readouterr()
        .out.strip()
        .splitlines()[-1]
        .startswith("fail-under 0.85: FAIL: worst case 0.8000")
    )
    assert release_gate({"accuracy": 0.90, "eps": 0.3, "n": 20}, 0.85) == 0


def _readme_block(lang: str) -> str:
    """The README's "Bring your own model" code block in ``lang``, as written."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Bring your own model") :]
    start = section.index(f"```{lang}\n") + len(f"```{lang}\n")
    return section[start : section.index("```", start)]


def test_the_readmes_three_commands_as_written(small_cnn: SmallCNN, tmp_path: Path, start_server_fn) -> None:
    """README, "Bring your own model": the PyTorch export block run with a model of ours, then
    ``erc import`` exactly as written (in a fresh folder: its default store is ./model_store),
    then the server on that store answers with the embedding and typicality, like the file."""
    import os
    import shlex
    import subprocess
    import sys

    import httpx

    from tests.conftest import png_bytes

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(_readme_block("python"), {"torch": torch, "model": small_cnn})  # writes net.pt2
    finally:
        os.chdir(cwd)
    commands = [ln for ln in _readme_block("bash").splitlines() if ln.strip()]
    assert commands[0].startswith("erc import net.pt2") and commands[1] == "erc serve"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(
        shlex.split(commands[0]), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    x, _ = _images(4)
    with torch.no_grad():
        logits, _ = small_cnn(x)
    srv = start_server_fn(tmp_path / "model_store", tmp_path)  # `erc serve` on the default store
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for i in range(len(x)):
                png = png_bytes((x[i, 0].numpy() * 255).round().astype(np.uint8))
                r = c.post("/v1/models/mine:predict?return_embedding=true", content=png,
                           headers={"content-type": "image/png"})  # fmt: skip
                assert r.status_code == 200, r.text
                pred = r.json()["predictions"][0]
                assert pred["label"] == int(logits[i].argmax()) and len(pred["embedding"]) == 32
                assert np.isfinite(pred["typicality"]["mahalanobis"])
    finally:
        assert srv.stop(), srv.log.read_text()[-3000:]
