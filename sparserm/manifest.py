"""Run folders, manifests and content hashes.

Every stage writes ``manifest.json`` beside its outputs: the resolved config, package versions, seed,
git commit, the machine (CPU, GPUs) and input checksums. Caches are keyed by a hash of what produced them.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from sparserm.config import Config, to_dict

PACKAGES = ("sparserm", "torch", "ray", "transformers", "sae-lens", "peft", "datasets", "deepspeed",
            "safetensors", "gguf", "vllm", "trl")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    out["python"] = platform.python_version()
    return out


def cpu_info() -> dict:
    """The CPU (the machines' CPU changes from day to day, so every timing names it)."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model_name": name or platform.processor() or None, "cores": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx": bool({"amx_tile", "amx_bf16"} & flags)}


def machine_info() -> dict:
    """The CPU and the CUDA GPUs this process sees (names and memory; none on a CPU machine)."""
    gpus = []
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpus.append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
    except Exception:  # noqa: BLE001 - a broken CUDA install still gets its manifest written
        pass
    return {"cpu": cpu_info(), "gpus": gpus, "hostname": platform.node()}


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_checksum(path: str) -> str:
    """sha256 of a local file; for a hub id, the id itself (its revision is the hub's business)."""
    p = Path(path).expanduser()
    return file_sha256(p) if p.is_file() else f"id:{path}"


def stable_hash(obj: Any, length: int = 16) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def run_home(cfg: Config, stage: str, output_dir: str | Path | None = None) -> str:
    """Where a run's outputs live: ``output_dir``, else ``run.output_dir``, else a new ``runs/<stage>-<time>``;
    a local path or a storage URI (``sparserm.storage``)."""
    return str(output_dir or cfg.run.output_dir or Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}")


def make_run_dir(cfg: Config, stage: str, output_dir: str | Path | None = None) -> Path:
    """The local folder a stage writes into: the output path, or for a storage URI this node's mirror of it,
    filled with what the URI already holds (a rerun resumes it); the caller pushes it back
    (``sparserm.storage.push``)."""
    from sparserm.storage import local_dir, pull

    home = run_home(cfg, stage, output_dir)
    out = local_dir(home)
    pull(home, out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_manifest(out_dir: Path, cfg: Config, stage: str, inputs: dict[str, str] | None = None,
                   extra: dict | None = None) -> Path:
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": to_dict(cfg),
        "seed": cfg.run.seed,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "argv": sys.argv,
        "inputs": inputs or {},
        **(extra or {}),
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object a line, written atomically (a killed job never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def model_key(model_cfg) -> dict:
    """What names a model's weights and text format (not where it runs or what a reward model reads of it), and
    the version of how texts become its tokens (``sparserm.model.text.ENCODING_VERSION``)."""
    from sparserm.model.text import ENCODING_VERSION

    return {**{k: getattr(model_cfg, k) for k in ("name", "gguf_file", "revision", "dtype", "chat_template")},
            "encoding": ENCODING_VERSION}


class StaleArtifactError(ValueError):
    """An artifact on disk that other inputs or settings produced."""


def key_diff(stored: Any, key: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two keys (nested dicts) differ."""
    if isinstance(stored, dict) and isinstance(key, dict):
        out = []
        for k in sorted(set(stored) | set(key), key=str):
            out += key_diff(stored.get(k), key.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if json.dumps(stored, sort_keys=True, default=str) == json.dumps(key, sort_keys=True, default=str) \
        else [prefix or "(whole key)"]


def check_key(stored: dict | None, key: dict, what: str | Path) -> None:
    """Refuse an artifact whose recorded key is not ``key``, naming the fields that differ."""
    diff = ["(no key recorded)"] if stored is None else key_diff(stored, key)
    if diff:
        raise StaleArtifactError(f"{what} was produced by other inputs or settings (differs in: {', '.join(diff)}); "
                                 "rerun with the settings that made it, or use a new output directory")


def folder_hash(folder: str | Path, patterns: tuple[str, ...] = ("*.json", "*.safetensors")) -> str:
    """Content hash of a folder's artifact files (names and bytes), for keys that name what a model was."""
    root = Path(folder)
    files = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file()})
    return stable_hash([[str(p.relative_to(root)), file_sha256(p)] for p in files])
