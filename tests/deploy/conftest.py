"""Rootful podman for the deploy tests: a private containers.conf, and a preflight that checks,
before anything is built, that containers on a compose network can reach each other by name.

Why a preflight: Debian 12's podman 4.3 defaults to the CNI network backend, whose plugins package
has no DNS plugin; containers then get no name resolution, and the stack's requests from one
container to another (``http://torchserve:8080``) fail deep inside a test with "Name or service not
known". The containers.conf written here picks the backend explicitly (netavark, with aardvark-dns
for names: podman's own default since 4.0), so the result does not depend on what a machine
happens to have; ``make deploy-deps`` installs both. The preflight proves it in a few seconds on a
tiny image assembled from host binaries (no debootstrap, no registry) and fails at once with the
package to install when it does not hold.

Why the label and the prune: every run builds the stack from a fresh context (a newly trained
model), so each build untags the previous run's images and leaves its build stages behind, about
6 GB a run; after a few runs the disk filled up in the middle of a build ("no space left on device").
Every image these tests build carries ``BUILD_LABEL``; before building and after the stack is down,
the labelled images nothing refers to any more are pruned, which keeps one set of tagged images
(and the layer cache under them) and touches no image that these tests did not build. A disk
preflight fails at once, with what to free, where a build would otherwise fail ten minutes in.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BASE_IMAGE = "localhost/localbase:bookworm"
PROBE_IMAGE = "localhost/erc-dns-probe:1"
NETWORK_BACKEND = "netavark"
# ulimits at or below the host's, runc (crun fails on this host's cgroups), cgroupfs (no systemd),
# and the network backend named explicitly (see the module docstring and docs/deploy.md).
CONTAINERS_CONF = (
    '[containers]\ndefault_ulimits = ["nofile=8192:8192", "nproc=8192:8192"]\n'
    '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
    f'[network]\nnetwork_backend = "{NETWORK_BACKEND}"\n'
)
# Where Debian's podman looks for its network helpers (containers.conf helper_binaries_dir).
HELPER_DIRS = ("/usr/local/libexec/podman", "/usr/local/lib/podman", "/usr/libexec/podman", "/usr/lib/podman")
DEPLOY_PACKAGES = "podman runc debootstrap docker-compose netavark aardvark-dns iptables"
# Stamped on every image (and every build stage) the deploy tests build; see the module docstring.
BUILD_LABEL = "io.erc.deploy-test=1"
# Free space a build of the whole stack needs in podman's image store and in its temporary
# directory: a cold build of the stack took 14.5 GiB at its peak (docs/deploy.md, "Disk").
MIN_FREE_GIB = 20


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: int = 1200) -> str:
    """Run a command; on failure raise with the tail of its output."""
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res.stdout


def _helper(name: str) -> str | None:
    for d in HELPER_DIRS:
        if os.access(Path(d) / name, os.X_OK):
            return str(Path(d) / name)
    return None


def _probe_rootfs_tar(dest: Path) -> Path:
    """A tarball of a minimal root file system made of this host's ``getent`` and ``sleep`` and the
    libraries they link (glibc carries the files and dns NSS modules built in)."""
    binaries = [shutil.which("getent"), shutil.which("sleep")]
    assert all(binaries), "getent and sleep are part of every Debian system"
    files: set[str] = set()
    for binary in binaries:
        assert binary is not None
        files.add(os.path.realpath(binary))
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            for part in line.split():
                if part.startswith("/"):
                    files.add(part)
    tar_path = dest / "probe-rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        for f in sorted(files):
            tar.add(os.path.realpath(f), arcname=f.lstrip("/"))
        for name in ("getent", "sleep"):
            path = shutil.which(name)
            assert path is not None
            tar.add(os.path.realpath(path), arcname=f"bin/{name}")
        conf = dest / "nsswitch.conf"
        conf.write_text("hosts: files dns\n")
        tar.add(conf, arcname="etc/nsswitch.conf")
    return tar_path


def check_container_dns(env: dict[str, str], workdir: Path) -> None:
    """Fail with the package to install unless two containers on a new network resolve each other."""
    for helper in ("netavark", "aardvark-dns"):
        if _helper(helper) is None:
            pytest.fail(
                f"{helper} is missing from {', '.join(HELPER_DIRS)}: podman cannot give containers on a "
                f"compose network names to reach each other by. Install Debian's {helper} (make deploy-deps "
                f"installs {DEPLOY_PACKAGES})",
                pytrace=False,
            )
    backend = run(["podman", "info", "--format", "{{.Host.NetworkBackend}}"], env).strip()
    if backend != NETWORK_BACKEND:
        pytest.fail(
            f"podman uses the {backend!r} network backend although the deploy tests' containers.conf asks "
            f"for {NETWORK_BACKEND!r}: is CONTAINERS_CONF overridden?",
            pytrace=False,
        )
    if subprocess.run(["podman", "image", "exists", PROBE_IMAGE], env=env).returncode != 0:
        tar = _probe_rootfs_tar(workdir)
        run(["podman", "import", str(tar), PROBE_IMAGE], env, timeout=120)
    tag = secrets.token_hex(4)
    network, server = f"erc-dns-probe-{tag}", f"erc-dns-probe-server-{tag}"
    try:
        run(["podman", "network", "create", network], env, timeout=60)
        run(
            ["podman", "run", "-d", "--name", server, "--network", network, PROBE_IMAGE, "/bin/sleep", "60"],
            env,
        )
        deadline = time.monotonic() + 20
        while True:
            res = subprocess.run(
                ["podman", "run", "--rm", "--network", network, PROBE_IMAGE, "/bin/getent", "hosts", server],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if res.returncode == 0 and res.stdout.strip():
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"two containers on a new {backend} network cannot resolve each other by name "
                    f"(getent hosts {server}: exit {res.returncode} {res.stderr.strip()[-300:]}): the "
                    "stack's services could not reach each other. Install Debian's aardvark-dns and "
                    "netavark (make deploy-deps)",
                    pytrace=False,
                )
            time.sleep(1)
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", server], env=env, capture_output=True)
        subprocess.run(["podman", "network", "rm", "-f", network], env=env, capture_output=True)


def prune_own_images(env: dict[str, str]) -> int:
    """Remove the images built by these tests that no tag and no container refers to; returns how many."""
    out = run(["podman", "image", "prune", "-f", "--filter", f"label={BUILD_LABEL}"], env, timeout=600)
    return len(out.split())


def check_free_disk(env: dict[str, str]) -> None:
    """Fail, naming the directory and what to remove, unless a build of the stack has room."""
    store = run(["podman", "info", "--format", "{{.Store.GraphRoot}}"], env).strip()
    # Where buildah writes layers before committing them (containers.conf's image_copy_tmp_dir).
    scratch = env.get("TMPDIR", "/var/tmp")
    for what, path in (("podman's image store", store), ("podman's temporary directory", scratch)):
        free = shutil.disk_usage(path).free / 2**30
        if free < MIN_FREE_GIB:
            pytest.fail(
                f"{free:.1f} GiB free in {path} ({what}); building the stack's images needs about "
                f"{MIN_FREE_GIB} GiB. `podman system df` shows what holds the space; `podman image prune` "
                "removes images nothing refers to",
                pytrace=False,
            )


def _base_image(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> float | None:
    """Build the Debian base image with debootstrap unless it exists; returns seconds spent."""
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=env).returncode == 0:
        return None
    t0 = time.perf_counter()
    rootfs = tmp_path_factory.mktemp("rootfs")
    mirror = "http://deb.debian.org/debian"
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        uris = [
            ln.split(":", 1)[1].strip() for ln in sources.read_text().splitlines() if ln.startswith("URIs:")
        ]
        mirror = uris[0] if uris else mirror
    run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], env)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(
        ["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=env, check=True, capture_output=True
    )
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    return round(time.perf_counter() - t0, 1)


class Podman:
    """Rootful podman with the private containers.conf: commands, compose projects, timings."""

    build_label = BUILD_LABEL  # for every image a test builds: prune_own_images finds them by it

    def __init__(self, env: dict[str, str], timings: dict[str, float]) -> None:
        self.env = env
        self.timings = timings

    def run(self, cmd: list[str], cwd: Path | None = None, timeout: int = 1200, **env: str) -> str:
        return run(cmd, {**self.env, **env}, cwd, timeout)

    def timed(
        self, name: str, cmd: list[str], cwd: Path | None = None, timeout: int = 1800, **env: str
    ) -> str:
        t0 = time.perf_counter()
        out = self.run(cmd, cwd, timeout, **env)
        self.timings[name] = round(time.perf_counter() - t0, 1)
        return out

    def ok(self, cmd: list[str]) -> bool:
        """Whether a command exits 0 (health checks, probes)."""
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def exec_python(self, container: str, code: str) -> str:
        return self.run(["podman", "exec", container, "python3", "-c", code], timeout=120)

    def project_containers(self, project: str) -> list[str]:
        out = self.run(
            [
                "podman",
                "ps",
                "-a",
                "--filter",
                f"label=io.podman.compose.project={project}",
                "--format",
                "{{.Names}}",
            ]
        )
        return [ln for ln in out.split() if ln]

    def write_timings(self, repo: Path) -> None:
        sys.stderr.write(f"\ndeploy timings: {json.dumps(self.timings)}\n")
        (repo / "build").mkdir(exist_ok=True)
        (repo / "build" / "deploy-timings.json").write_text(json.dumps(self.timings, indent=2))


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """Podman with the private containers.conf and this interpreter's scripts on PATH, the offline
    build knobs of docker-compose.yml set (docs/deploy.md), the name-resolution preflight passed and
    the base image built."""
    assert os.geteuid() == 0, "rootful podman: run the deploy tests as root"
    for tool in ("podman", "debootstrap", "docker-compose"):
        assert shutil.which(tool), f"{tool} missing: make deploy-deps installs {DEPLOY_PACKAGES}"
    workdir = tmp_path_factory.mktemp("podman")
    conf = workdir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(conf),
        "BUILDAH_FORMAT": "docker",  # keeps the images' HEALTHCHECK (the OCI format drops it)
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "ERC_BASE_IMAGE": BASE_IMAGE,
        "ERC_PROMETHEUS_BASE_IMAGE": BASE_IMAGE,
        "ERC_DEBIAN_BASE_IMAGE": BASE_IMAGE,
        "ERC_PIP_ARGS": "--no-index",
    }
    pm = Podman(env, {})
    pm.timings["images_pruned_before"] = prune_own_images(env)  # left by an interrupted run
    check_free_disk(env)
    t0 = time.perf_counter()
    check_container_dns(env, workdir)
    pm.timings["dns_preflight_s"] = round(time.perf_counter() - t0, 1)
    seconds = _base_image(env, tmp_path_factory)
    if seconds is not None:
        pm.timings["base_image_s"] = seconds
    yield pm
    sys.stderr.write(f"\ndeploy tests: pruned {prune_own_images(env)} superseded images\n")
