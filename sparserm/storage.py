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

__all__ = ["is_uri", "local_dir", "pull", "push", "fetched"]


def is_uri(target: str | os.PathLike | None) -> bool:
    """True for a storage URI (``scheme://...``); a local path, ``file://`` included, is not one."""
    text = str(target or "")
    return "://" in text and not text.startswith("file://")


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

    return Path(default_cache_dir()).expanduser() / "storage" / hashlib.sha256(str(target).encode()).hexdigest()[:16]


def _remote(home: str, folder: Path) -> tuple[object, str, Path]:
    """(filesystem, remote path, local folder) of ``folder``, a folder inside ``local_dir(home)``."""
    folder = Path(folder)
    try:
        rel = folder.relative_to(local_dir(home))
    except ValueError:
        raise ValueError(f"{folder} is not inside the local mirror {local_dir(home)} of {home}") from None
    fs, root = _filesystem(home)
    remote = root.rstrip("/") if str(rel) == "." else f"{root.rstrip('/')}/{rel.as_posix()}"
    return fs, remote, folder


def pull(home: str | os.PathLike, folder: Path) -> bool:
    """Copies what ``home`` (a URI) holds at ``folder``'s place into ``folder``; True when anything was there.
    A no-op (False) for a local ``home``."""
    if not is_uri(home):
        return False
    import pyarrow.fs as pafs

    fs, remote, folder = _remote(str(home), folder)
    if fs.get_file_info(remote).type != pafs.FileType.Directory:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(remote, str(folder), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
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
