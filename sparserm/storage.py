"""Shared storage: a stage's outputs and caches on a local path or on a storage URI, so that nodes which share no
disk share results.

``run.cache_dir`` and a stage's output folder (``--output-dir`` / ``run.output_dir``) each take a local path or a
URI that pyarrow opens: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``, with pyarrow's query
options (an S3-compatible server: ``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``; credentials
from the usual environment, ``AWS_ACCESS_KEY_ID`` ...), as Ray Train's ``storage_path`` does.

Work happens in a local folder, as before: for a URI, a node-local mirror
``<SPARSERM_CACHE>/storage/<hash of the URI>`` (:func:`local_dir`). A cache folder (an activation cache, a trained
SAE) is pulled from the URI before the stage looks for it locally (:func:`pull`) and pushed once it is complete
(:func:`push`); an output folder is pulled when the run starts (so a rerun anywhere resumes what was stored) and
pushed when the command ends, failed or not, so nothing already done is lost. A local path is used as it is and
every call here is a no-op for it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["is_uri", "portable", "base_name", "local_dir", "pull", "push", "fetched", "shard_home", "place_of", "upload",
           "train_storage", "sync_down"]

_MIRRORS: dict[str, str] = {}  # this process's mirrors: local folder -> the URI it stands for


def is_uri(target: str | os.PathLike | None) -> bool:
    """True for a storage URI (``scheme://...``); a local path, ``file://`` included, is not one."""
    text = str(target or "")
    return "://" in text and not text.startswith("file://")


def portable(target: str | os.PathLike) -> str:
    """``target`` as another process (a Serve replica, a worker) can find it: a URI as it is (each pulls it), a
    local path made absolute."""
    return str(target) if is_uri(target) else str(Path(local_dir(target)).resolve())


def base_name(target: str | os.PathLike) -> str:
    """The last part of ``target``'s path (of a URI: without its ``?query``), e.g. a served model's name."""
    from urllib.parse import urlparse

    where = portable(target)
    return Path(urlparse(where).path if is_uri(where) else where).name


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError / ValueError by scheme
        raise ValueError(f"storage URI {uri!r}: pyarrow cannot open it ({exc})") from exc


def local_dir(target: str | os.PathLike) -> Path:
    """The local folder that stands for ``target``: the path itself, or this node's mirror of a URI."""
    if not is_uri(target):
        text = str(target)
        return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
    from sparserm.config import default_cache_dir

    folder = Path(default_cache_dir()).expanduser() / "storage" / hashlib.sha256(str(target).encode()).hexdigest()[:16]
    _MIRRORS[str(folder)] = str(target)
    return folder


def _home_of(folder: Path) -> str | None:
    """The URI whose mirror (made in this process) holds ``folder``; None: a plain local folder."""
    for parent in (Path(folder), *Path(folder).parents):
        if str(parent) in _MIRRORS:
            return _MIRRORS[str(parent)]
    return None


def _remote(home: str, folder: Path) -> tuple[object, str, Path]:
    """(filesystem, remote path, local folder) of ``folder``, a folder inside ``local_dir(home)``."""
    folder = Path(folder)
    try:
        rel = folder.relative_to(local_dir(home))
    except ValueError:
        raise ValueError(f"{folder} is not inside the local mirror {local_dir(home)} of {home}") from None
    return (*_at(home, rel.as_posix()), folder)


def _at(home: str, rel: str) -> tuple[object, str]:
    """(filesystem, path) of the place ``rel`` (posix, "." for the root) under the URI ``home``."""
    fs, root = _filesystem(home)
    return fs, (root.rstrip("/") if rel in ("", ".") else f"{root.rstrip('/')}/{rel}")


def pull(home: str | os.PathLike, folder: Path) -> bool:
    """Copies what ``home`` (a URI) holds at ``folder``'s place into ``folder``; True when anything was there.
    A no-op (False) for a local ``home``."""
    if not is_uri(home):
        return False
    import pyarrow.fs as pafs

    fs, remote, folder = _remote(str(home), folder)
    if fs.get_file_info(remote).type != pafs.FileType.Directory:
        return False
    local = pafs.LocalFileSystem()
    for info in fs.get_file_info(pafs.FileSelector(remote, recursive=True)):
        mine = folder / info.path[len(remote):].lstrip("/")
        if info.type == pafs.FileType.File and not (mine.is_file() and mine.stat().st_size == info.size):
            _copy_file(fs, info.path, local, str(mine))  # a file already here at its size is not fetched again
    folder.mkdir(parents=True, exist_ok=True)
    return True


def push(home: str | os.PathLike, folder: Path, marker: str | None = None) -> None:
    """Copies ``folder`` (inside ``local_dir(home)``) to its place under the URI ``home``: files already there are
    overwritten, none is deleted. ``marker`` (a file name in ``folder``, e.g. the one that says a cache is
    complete) is copied after everything else, so a reader that finds it finds the rest. A no-op for a local
    ``home``."""
    if not is_uri(home):
        return
    import pyarrow.fs as pafs

    fs, remote, folder = _remote(str(home), folder)
    if not folder.is_dir():
        return
    local = pafs.LocalFileSystem()
    fs.create_dir(remote, recursive=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != marker):
        _copy_file(local, str(path), fs, f"{remote}/{path.relative_to(folder).as_posix()}")
    if marker and (folder / marker).is_file():
        _copy_file(local, str(folder / marker), fs, f"{remote}/{marker}")


def _copy_file(src_fs, src: str, dst_fs, dst: str) -> None:
    dst_fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)  # a no-op on object stores; HDFS needs the parents
    with src_fs.open_input_stream(src) as fin, dst_fs.open_output_stream(dst) as fout:
        while chunk := fin.read(1 << 24):
            fout.write(chunk)


def fetched(target: str | os.PathLike) -> Path:
    """A local folder holding ``target``: a local path as it is; a URI pulled into this node's mirror (a folder
    that is not there raises FileNotFoundError naming it)."""
    if not is_uri(target):
        return local_dir(target)
    folder = local_dir(target)
    if not pull(target, folder):
        raise FileNotFoundError(f"{target}: no such folder in storage")
    return folder


def shard_home(home: str | os.PathLike, folder: Path) -> tuple[str, str] | None:
    """For workers on other nodes: (URI, ``folder``'s place under it) when ``home`` is a URI, else None; a worker
    uploads each file it writes there (:func:`upload`), whatever its own node's mirror is."""
    if not is_uri(home):
        return None
    return str(home), Path(folder).relative_to(local_dir(home)).as_posix()


def place_of(folder: Path) -> tuple[str, str] | None:
    """:func:`shard_home` of ``folder`` when it is inside a URI's mirror made in this process (None otherwise): for
    a worker that writes into ``folder`` on whatever node it runs."""
    home = _home_of(folder)
    return None if home is None else shard_home(home, folder)


def upload(place: tuple[str, str], path: Path) -> None:
    """Copies the file ``path`` to ``place`` (a :func:`shard_home` pair) under its own name."""
    import pyarrow.fs as pafs

    fs, remote = _at(*place)
    _copy_file(pafs.LocalFileSystem(), str(path), fs, f"{remote}/{Path(path).name}")


def train_storage(folder: Path) -> tuple[str, object | None]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for a run kept in ``folder``: the URI's filesystem and
    path when ``folder`` is inside a URI's mirror, so every worker writes its checkpoints there from any node;
    else the local folder."""
    home = _home_of(folder)
    if home is None:
        return str(Path(folder).resolve()), None
    fs, remote, _ = _remote(home, Path(folder))
    return remote, fs


def sync_down(folder: Path) -> None:
    """Brings ``folder`` up to date from the URI whose mirror holds it (what workers wrote there); a no-op for a
    plain local folder."""
    home = _home_of(folder)
    if home is not None:
        pull(home, Path(folder))
