"""What a steering map is built from: the preference triples and the two SAE folders, each checked first.

Triples: ``steer.data`` (empty: ``data.sources``), read by the repo's loaders, their train split only (the split of
``data.eval_fraction``, so evaluation prompts never shape the map), the first ``steer.max_triples`` in file order.
A source is read only as far as that needs (the loaders' ``max_pairs``, doubled until the train split has enough),
and a record the loaders reject in the part read (empty response, missing field, ...) stops the build with its row
id and reason (``steer.on_bad_row=error``), or is left out and listed in ``rejects.jsonl`` (``skip``).

SAEs: each side's folder from its source (``steering.saes``: ``steer.<side>_sae_dir``, a registry SAE, or one
trained here); its layer is ``steer.input_layer`` / ``steer.output_layer``, else the layer the folder records (as
``align.loss.fpo_layer`` falls back).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from sparserm.config import Config, ConfigError, DataSource
from sparserm.data import DataError, is_eval, load_pairs
from sparserm.manifest import input_checksum

STATEFUL_NORMS = ("constant_norm_rescale", "layer_norm")  # decode reads the norm of the token encoded last


@dataclass
class Triples:
    rows: list[dict]  # prompt, chosen, rejected, source, row_id
    rejects: list[dict]  # the loaders' rejects in the part read
    checksums: dict[str, str]  # per source path
    summary: dict  # per source: n_read, n_triples, n_rejected, reasons


def _read(src: DataSource, need: int | None, cfg: Config, split: str = "train"):
    """(LoadResult, its ``split`` rows) of one source, read as far as ``need`` such rows take (None: all)."""
    d = cfg.data
    share = d.eval_fraction if split == "eval" else 1 - d.eval_fraction
    cap = None if need is None else math.ceil(need / share) + 8
    while True:
        limit = cap if src.max_pairs is None else (src.max_pairs if cap is None else min(cap, src.max_pairs))
        result = load_pairs(src.path, src.format, max_pairs=limit, split=src.split, max_per_prompt=src.max_per_prompt)
        train = [r for r in result.rows if is_eval(r["prompt"], d.eval_fraction, d.split_salt) == (split == "eval")]
        exhausted = limit is None or len(result.rows) < limit or limit == src.max_pairs
        if need is None or len(train) >= need or exhausted:
            return result, train[:need] if need is not None else train
        cap *= 2


def load_triples(cfg: Config, split: str = "train") -> Triples:
    """The first ``steer.max_triples`` triples of ``split`` (train: what a map is built from; eval: what
    ``steer layers`` checks a map against)."""
    s = cfg.steer
    want = s.max_triples or None
    rows, rejects, checksums, summary = [], [], {}, {}
    for src in s.data or cfg.data.sources:
        need = None if want is None else want - len(rows)
        if need == 0:
            break
        result, train = _read(src, need, cfg, split)
        rows += train
        rejects += result.rejects
        checksums[src.path] = input_checksum(src.path)
        summary[src.path] = {"n_read": result.n_read, "n_triples": len(train), "n_rejected": len(result.rejects),
                             "reasons": result.reason_counts()}
    if rejects and s.on_bad_row == "error":
        shown = "; ".join(f"row {r['row_id']}: {r['reason']} ({r['detail']})" for r in rejects[:5])
        more = f" and {len(rejects) - 5} more" if len(rejects) > 5 else ""
        raise DataError(f"steer build: {len(rejects)} bad triple(s) in the data read: {shown}{more}. Fix them, or set "
                        "steer.on_bad_row=skip to leave them out (listed in rejects.jsonl)")
    if not rows:
        raise DataError(f"steer build: no {split}-split triples in {[src.path for src in s.data or cfg.data.sources]}")
    return Triples(rows, rejects, checksums, summary)


@dataclass(frozen=True)
class SAESide:
    """One side's SAE as the config names it: folder (absolute), the block it reads, its sizes."""

    side: str  # input | output
    folder: str
    layer: int
    d_in: int
    d_sae: int


def sae_side(cfg: Config, side: str, folder: str | None, layer: int | None = None,
             key: str | None = None) -> SAESide:
    """The SAE at ``folder`` as one side, reading ``layer`` (None: ``steer.<side>_layer``, else the layer the folder
    records), refused naming ``key`` (default ``steer.<side>_sae_dir``) when it cannot serve."""
    from sparserm.sae.autoencoder import META_FILE
    from sparserm.sae.checks import model_hidden_size, shape_from_cfg

    key = key or f"steer.{side}_sae_dir"
    if not folder or not Path(folder, "cfg.json").is_file():
        raise ConfigError(f"{key}={folder!r} is invalid: expected a sae-lens SAE folder (cfg.json and weights), e.g. "
                          "one `sparserm sae train` wrote")
    sae_cfg = json.loads(Path(folder, "cfg.json").read_text())
    meta_file = Path(folder, META_FILE)
    shape = shape_from_cfg(sae_cfg, json.loads(meta_file.read_text()) if meta_file.is_file() else {})
    if layer is None:
        layer = getattr(cfg.steer, f"{side}_layer")
    if layer is None:
        layer = shape.layer
    if layer is None:
        raise ConfigError(f"steer.{side}_layer=None is invalid: the SAE at {folder} records no layer; set it")
    norm = sae_cfg.get("normalize_activations", "none")
    if side == "output" and norm in STATEFUL_NORMS:
        raise ConfigError(f"{key}={folder!r} is invalid: its normalize_activations={norm!r} makes decode depend on "
                          "the token encoded last, so decode(a') - decode(a) is not an edit of one token")
    d_model = model_hidden_size(cfg)
    if d_model is not None and shape.d_in != d_model:
        raise ConfigError(f"{key}={folder!r} is invalid: its d_in={shape.d_in}, but model.name={cfg.model.name!r} "
                          f"has hidden size {d_model}: the SAE belongs to another model")
    return SAESide(side, str(Path(folder).resolve()), int(layer), int(shape.d_in), int(shape.d_sae))


def sae_sides(cfg: Config, work_dir: str | Path) -> tuple[SAESide, SAESide]:
    """(input, output) from their sources (``steering.saes``: a folder, a registry SAE, or trained here with
    ``work_dir`` for the features pass's rejects and summary), the input read no later than the output (the gate
    comes first in the same forward)."""
    from sparserm.steering.saes import sae_folder, source_of

    inp, out = (sae_side(cfg, side, sae_folder(cfg, side, work_dir),
                         key=None if source_of(cfg, side) == "dir" else f"the {source_of(cfg, side)} SAE of {side}")
                for side in ("input", "output"))
    if inp.layer > out.layer:
        raise ConfigError(f"steer.input_layer={inp.layer} is invalid: expected <= steer.output_layer={out.layer} "
                          "(the prompt gate is read before the edit, in the same forward)")
    return inp, out
