"""The project as a new user gets it: the wheel, installed into a new virtual environment outside
the checkout, runs every command from a folder of its own.

The wheel is built from a copy of the sources (nothing is written into the checkout) and installed
with ``--no-deps`` into ``python -m venv --without-pip``; its dependencies (torch and the rest,
already installed in this interpreter's environment) are made importable by a ``.pth`` line that
names this environment's ``site-packages`` only, whose own ``.pth`` files (the editable install's
finder) are never run: ``service`` and ``training`` come from the wheel, and the checkout is on
no path. No data setting is inherited: MNIST is given with ``--data-dir`` only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.launch import free_port, http_status

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "training", "service"]
# What the commands read at run time, shipped as package data.
PACKAGE_DATA = [
    "service/deploy/nginx.conf",
    "service/deploy/prometheus.yml",
    "service/deploy/torchserve.properties",
    "service/static/console/index.html",
    "service/static/console/console.js",
    "service/static/console/console.css",
    "service/torchserve_handler.py",
    "training/configs/quickstart.yaml",
]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
        check=True,
        cwd=tmp,
        timeout=300,
    )
    (wheel,) = dist.glob("er_classifier_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in PACKAGE_DATA if n not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert not any(n.startswith(("tests/", "docker/", "bench/", "experiments/")) for n in names)

    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        cwd=tmp,
        timeout=300,
    )
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_erc_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    # The [torchserve] extra's commands, as its install would write them (erc stack runs both).
    for script, (module, func) in {
        "torchserve": ("ts.model_server", "start"),
        "torch-model-archiver": ("model_archiver.model_packaging", "generate_model_archive"),
    }.items():
        path = env_dir / "bin" / script
        path.write_text(f"#!{py}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        path.chmod(0o755)
    return env_dir


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every command runs in (and HOME): no checkout, no data below it."""
    return tmp_path_factory.mktemp("user")


@pytest.fixture(scope="module")
def env(venv: Path, home: Path) -> dict[str, str]:
    (home / "tmp").mkdir(exist_ok=True)
    keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "USER", "LOGNAME")}
    return {
        **keep,
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "ERC_TORCH_THREADS": "1",
    }


def erc(env: dict[str, str], home: Path, *args: str, timeout: float = 300) -> str:
    res = subprocess.run(["erc", *args], cwd=home, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (
        f"erc {' '.join(args)}: {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    )
    return res.stdout


@pytest.fixture(scope="module")
def mnist(data_dir: Path) -> Path:
    return data_dir / "mnist"


@pytest.fixture(scope="module")
def store(env: dict[str, str], home: Path, mnist: Path) -> Path:
    """A slim ER-Classifier trained for one epoch on 1,000 MNIST images by the installed erc, exported."""
    erc(
        env,
        home,
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(mnist),
        "--method",
        "er-minus",
        "--width",
        "0.25",
        "--train-subset",
        "1000",
        "--eval-subset",
        "100",
        "--batch-size",
        "50",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--out",
        "runs/slim",
        "--no-progress",
    )
    erc(
        env,
        home,
        "export",
        "runs/slim",
        "--name",
        "slim",
        "--store",
        "model_store",
        "--data-dir",
        str(mnist),
        "--eval-n",
        "100",
        "--robust-steps",
        "2",
        "--typicality-fit-n",
        "0",
        "--no-progress",
    )
    return home / "model_store"


def test_installed_outside_the_checkout(venv: Path, env: dict[str, str], home: Path) -> None:
    code = (
        "import json, sys, service, training; "
        "print(json.dumps({'service': service.__file__, 'training': training.__file__, 'path': sys.path}))"
    )
    res = subprocess.run(
        [venv / "bin" / "python", "-c", code], cwd=home, env=env, capture_output=True, text=True, check=True
    )
    where = json.loads(res.stdout)
    assert Path(where["service"]).is_relative_to(venv) and Path(where["training"]).is_relative_to(venv)
    # The checkout is on no path (cwd included): no entry but the wheel's own can provide the packages.
    paths = [Path(p or home).resolve() for p in where["path"]]
    assert REPO not in paths, where["path"]
    providers = [p for p in paths if (p / "service" / "__init__.py").exists() or (p / "training").is_dir()]
    assert providers == [Path(where["service"]).resolve().parents[1]], providers
    assert "train" in erc(env, home, "--help")


def test_data_from_data_dir_only(env: dict[str, str], home: Path, mnist: Path) -> None:
    info = json.loads(erc(env, home, "data", "info", "mnist", "--data-dir", str(mnist)))
    assert info["found"] and Path(info["data_dir"]).resolve() == mnist.resolve()
    # Without --data-dir nothing is found: no path beside a checkout or inside site-packages.
    res = subprocess.run(
        ["erc", "data", "info", "mnist"], cwd=home, env=env, capture_output=True, text=True, timeout=120
    )
    missing = json.loads(res.stdout)
    assert not missing["found"]
    assert not any("site-packages" in d or "shared" in d for d in missing["searched"]), missing["searched"]
    # erc data check on an image folder of a few MNIST digits.
    from training.data import load_split

    test = load_split("mnist", "test", mnist, n=20, seed=0)
    for i, (img, label) in enumerate(zip(test.images[:, 0].numpy(), test.labels.tolist(), strict=True)):
        (home / "digits" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(home / "digits" / str(label) / f"{i}.png")
    assert "20 image files" in erc(env, home, "data", "check", "digits", "--no-progress").splitlines()[-1]


def test_serve_answers_a_prediction(env: dict[str, str], home: Path, store: Path, mnist: Path) -> None:
    from training.data import load_split

    png = home / "digit.png"
    Image.fromarray(load_split("mnist", "test", mnist, n=1, seed=1).images[0, 0].numpy()).save(png)
    port = free_port()
    log = home / "serve.log"
    proc = subprocess.Popen(
        ["erc", "serve", "--store", str(store), "--port", str(port)],
        cwd=home,
        env={**env, "ERC_HOST": "127.0.0.1"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while http_status(url + "/readyz") != 200:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        req = urllib.request.Request(
            url + "/v1/models/slim:predict", data=png.read_bytes(), headers={"Content-Type": "image/png"}
        )
        body = json.load(urllib.request.urlopen(req, timeout=30))
        assert 0 <= body["predictions"][0]["label"] <= 9
        assert http_status(url + "/") == 200  # the console, from package data
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_stack_starts_and_stops(env: dict[str, str], home: Path, store: Path) -> None:
    if shutil.which("prometheus") is None or not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        pytest.fail("erc stack needs Debian's prometheus and nginx (make test installs them)")
    log = home / "stack.log"
    proc = subprocess.Popen(
        [
            "erc",
            "stack",
            "--store",
            str(store),
            "--model",
            "slim",
            "--replicas",
            "1",
            "--workers",
            "0",
            "--db",
            "sqlite",
        ],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
        text=True,
    )
    lines: list[str] = []
    workdir = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("logs in"):
                workdir = line.split()[2].rstrip(";")
                break
        text = "".join(lines)
        assert proc.poll() is None and "Prometheus" in text, text + log.read_text()[-3000:]
        api = re.search(r"^API\s+(\S+)", text, re.M)
        prom = re.search(r"^Prometheus\s+(\S+)", text, re.M)
        assert api and prom, text
        assert http_status(api.group(1) + "/readyz") == 200  # through nginx
        assert http_status(prom.group(1) + "/-/ready") == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(90)
        left = _processes_naming(workdir) if workdir else []
        for pid in left:  # never leave them running, whatever failed
            os.kill(pid, signal.SIGKILL)
    assert rc == 0, log.read_text()[-3000:]
    assert not left, f"still running after erc stack stopped: {left}"


def _processes_naming(text: str) -> list[int]:
    """Processes whose command line mentions ``text`` (the stack's own folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.fixture(autouse=True)
def _no_checkout_data(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # This process reads MNIST (for the digits) only through the explicit --data-dir path.
    monkeypatch.delenv("ERC_DATA_DIR", raising=False)
    yield
