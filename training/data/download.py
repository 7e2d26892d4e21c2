"""Download a dataset from its publisher (or a mirror), checking md5 while streaming; unpack safely.

Guarantees, whatever goes wrong (HTTP error, broken transfer, checksum mismatch, bad archive,
Ctrl-C):

- a file appears under its final name only complete and verified: bytes stream into a temporary
  ``.<name>.*.part`` file in the destination folder, which is ``os.replace``-d into place after
  the md5 matched, and deleted otherwise;
- an archive unpacks into a temporary folder beside the destination, and only its dataset folder
  (``cifar-10-batches-py`` ...) is renamed into place once complete, so nothing is ever left half
  extracted;
- archive members with absolute paths, ``..`` components, links that point outside the archive,
  or device and FIFO entries are refused (DataError) before anything is written.

Files already present with the right checksum are not fetched again, and an archive is not
fetched at all when its folder is already unpacked.

The mirror (``mirror=`` or ``$ERC_DATA_MIRROR``) replaces the dataset's base URL, with the same
file names below it; ``{name}`` in it is replaced by the dataset's name, so one mirror variable can
serve every dataset (``https://mirror.example/erc/{name}/``). ``file://`` URLs work too.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from training import __version__
from training.data.core import DataError, checksum_file
from training.data.datasets import DatasetSpec, get_spec, holds

__all__ = ["checksum_file", "download", "extract", "fetch", "source_url"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_USER_AGENT = f"erc-data/{__version__} (python-urllib)"
_DRIVE = re.compile(r"^[A-Za-z]:")


def source_url(spec: DatasetSpec, filename: str, mirror: str | None = None) -> str:
    """The URL of ``filename``: below ``mirror``, else ``$ERC_DATA_MIRROR``, else the publisher's base URL."""
    base = mirror or os.environ.get("ERC_DATA_MIRROR") or spec.base_url
    base = base.replace("{name}", spec.info.name)
    return base.rstrip("/") + "/" + urllib.parse.quote(filename)


def fetch(url: str, path: Path, md5: str, *, timeout: float = 60.0) -> Path:
    """Make ``path`` hold the file at ``url`` whose md5 is ``md5``; returns ``path``.

    Skips the transfer when ``path`` already has that md5. Any failure raises DataError naming the
    URL or file (and both checksums on a mismatch) and leaves neither a partial file under ``path``
    nor a temporary file behind.
    """
    md5 = md5.lower()
    if path.is_file():
        actual = checksum_file(path)
        if actual == md5:
            log.info("%s: already present, md5 ok", path)
            return path
        log.warning("%s: present but md5 %s != expected %s; downloading it again", path, actual, md5)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    tmp: Path | None = Path(tmp_name)
    try:
        log.info("downloading %s -> %s", url, path)
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=None) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        # http.client returns b"" rather than raising when the peer closes early on read(amt).
        if total is not None and received != total:
            raise DataError(f"{url}: transfer broke off after {received} of {total} bytes", path=path)
        actual = digest.hexdigest()
        if actual != md5:
            raise DataError(
                f"{path.name}: md5 mismatch for {url}: expected {md5}, got {actual} ({received} bytes); "
                "the download was discarded",
                path=path,
            )
        os.replace(tmp_name, path)
        tmp = None
        log.info("%s: %d bytes, md5 ok", path, received)
        return path
    except DataError:
        raise
    except urllib.error.HTTPError as exc:
        raise DataError(f"{url}: HTTP {exc.code} {exc.reason}", path=path) from exc
    except urllib.error.URLError as exc:
        raise DataError(f"{url}: cannot download: {exc.reason}", path=path) from exc
    # Timeouts, resets and protocol errors in the middle of the body.
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"{url}: transfer failed: {type(exc).__name__}: {exc}", path=path) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _member_path(archive: Path, name: str) -> PurePosixPath:
    """A member's path, refusing absolute ones and ``..`` components."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise DataError(f"{archive}: refusing member with an absolute path: {name!r}", path=archive)
    parts = PurePosixPath(posix).parts
    if ".." in parts:
        raise DataError(f"{archive}: refusing member with a '..' component: {name!r}", path=archive)
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _check_link(archive: Path, member: PurePosixPath, target: str, *, relative_to_member: bool) -> None:
    """Refuse a link whose target leaves the archive's tree (symlinks resolve from their folder,
    tar hard links from the archive root)."""
    posix = target.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise DataError(f"{archive}: refusing link {member} -> {target!r}: absolute target", path=archive)
    base = member.parent.as_posix() if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, posix))
    if resolved == ".." or resolved.startswith("../"):
        raise DataError(f"{archive}: refusing link {member} -> {target!r}: it points outside", path=archive)


def _extract_tar(archive: Path, into: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            rel = _member_path(archive, m.name)
            if m.issym():
                _check_link(archive, rel, m.linkname, relative_to_member=True)
            elif m.islnk():
                _check_link(archive, rel, m.linkname, relative_to_member=False)
            elif not (m.isfile() or m.isdir()):
                raise DataError(
                    f"{archive}: refusing special member {m.name!r} (device or FIFO)", path=archive
                )
        if hasattr(tarfile, "data_filter"):
            # Python's own guard (3.11.4+) on top of ours: also strips set-uid bits and the like.
            tar.extractall(into, members=members, filter="data")
        else:  # pragma: no cover - older 3.11 patch releases
            tar.extractall(into, members=members)


def _extract_zip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = _member_path(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                # zipfile writes links as small text files, but refuse ones that point outside anyway:
                # such an archive is not one of ours.
                _check_link(archive, rel, zf.read(info).decode("utf-8", "replace"), relative_to_member=True)
        zf.extractall(into)


def _replace_dir(src: Path, target: Path) -> None:
    """Move folder ``src`` to ``target``, replacing whatever is there, never leaving a mix of both."""
    if not (target.exists() or target.is_symlink()):
        os.replace(src, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    aside = old / target.name
    os.replace(target, aside)
    try:
        os.replace(src, target)
    except BaseException:
        os.replace(aside, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def extract(archive: Path, dest: Path, folder: str, check: Callable[[Path], bool] | None = None) -> Path:
    """Unpack ``folder`` (a top-level folder of the tar.gz/zip ``archive``) to ``dest / folder``.

    Everything is unpacked into a temporary folder inside ``dest`` first; ``check`` (if given)
    must accept the unpacked folder before it replaces ``dest / folder``. Other top-level
    entries of the archive are dropped. Returns ``dest / folder``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".extract", dir=dest))
    try:
        log.info("unpacking %s into %s", archive, dest)
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, work)
            else:
                _extract_tar(archive, work)
        except DataError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
            raise DataError(f"{archive}: corrupt or unreadable archive: {exc}", path=archive) from exc
        unpacked = work / folder
        if not unpacked.is_dir():
            found = sorted(p.name for p in work.iterdir())
            raise DataError(f"{archive}: has no top-level folder {folder}/ (found {found})", path=archive)
        if check is not None and not check(unpacked):
            raise DataError(f"{archive}: the unpacked {folder}/ lacks files the dataset needs", path=archive)
        target = dest / folder
        _replace_dir(unpacked, target)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def download(
    name: str,
    data_dir: str | os.PathLike[str],
    *,
    mirror: str | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> list[Path]:
    """Fetch (and unpack) dataset ``name`` into ``data_dir``, so ``load_split(name, ..., data_dir)`` works.

    ``mirror`` replaces the publisher's base URL (default ``$ERC_DATA_MIRROR``, else the
    publisher); ``checksums`` maps downloaded file names (e.g. ``"cifar-10-python.tar.gz"``) to
    the md5 to expect instead of the published one; ``timeout`` is the socket timeout in seconds.
    Returns the paths put in place or found valid: each downloaded file and, for archives, the
    unpacked folder. Any failure raises DataError (see the module docstring for what is left).
    """
    spec = get_spec(name)
    dest = Path(data_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    overrides = {k: v.lower() for k, v in (checksums or {}).items()}
    known = {r.filename for r in spec.resources}
    if set(overrides) - known:
        raise ValueError(
            f"checksums for unknown files {sorted(set(overrides) - known)}; "
            f"{spec.info.name} downloads {sorted(known)}"
        )
    paths: list[Path] = []
    for res in spec.resources:
        url = source_url(spec, res.filename, mirror)
        md5 = overrides.get(res.filename, res.md5)
        if not res.archive:
            paths.append(fetch(url, dest / res.filename, md5, timeout=timeout))
            continue
        if spec.folder is None:
            raise ValueError(f"{spec.info.name}: archive {res.filename} but no folder to unpack")
        target = dest / spec.folder
        if holds(spec, target):
            log.info("%s: already unpacked in %s; not downloading %s", spec.info.name, target, res.filename)
            paths.append(target)
            continue
        archive = fetch(url, dest / res.filename, md5, timeout=timeout)
        paths.append(archive)
        paths.append(extract(archive, dest, spec.folder, check=lambda p: holds(spec, p)))
    log.info("%s: ready in %s", spec.info.name, dest)
    return paths
