"""A steering-map folder on disk: ``map.safetensors`` and ``manifest.json``.

``map.safetensors`` holds the sparse map A as CSR over the input latents (:class:`ConditionalMap`): ``indptr``
int64 [m_in + 1], ``indices`` int64 [nnz] (output latents, ascending within a row), ``values`` float32 [nnz] and
``m_out`` int64 [1]. Sparse always, whatever the widths: a 16k x 16k map kept at 64 entries a row is 1M entries,
a dense one 1 GiB.

``manifest.json`` is the repo's run manifest (resolved config, seed, versions, git commit, input checksums) plus
``key`` (what produced the map: model identity and token budget, both SAEs by content hash and layer, the number of
triples and a hash of their texts, the sparsifier and the settings it reads; a folder holding another key is
refused naming the fields that differ) and ``map`` (sizes, both SAE folders, token counts, seconds). The manifest
is written last: a folder without one holds no map.

``densities.safetensors`` holds the per-triple densities G and D the map was formed from (``save_densities``).

``saes/input`` and ``saes/output`` hold both SAE folders (``bundle_saes``: hard links where the source is on the
same disk, else copies), and the manifest names them relative to the map folder: the folder is the whole map, so a
copy of it elsewhere, or on a storage URI (``load_map`` pulls one into this node's mirror), loads on any node.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sparserm.config import Config, build
from sparserm.manifest import StaleArtifactError, check_key, folder_hash, model_key, stable_hash
from sparserm.steering.conditional_map import ConditionalMap, sparsifier_key
from sparserm.steering.sources import SAESide

MAP_FILE, MANIFEST, DENSITIES, SAES = "map.safetensors", "manifest.json", "densities.safetensors", "saes"
STAGE = "steer-map"
DENSITY = "share_of_own_tokens_active"  # how g and rho are computed (a change of definition changes every key)


def map_key(cfg: Config, triples: list[dict], sides: tuple[SAESide, SAESide]) -> dict:
    return {"model": model_key(cfg.model), "max_tokens": cfg.model.max_tokens,
            **{s.side: {"sae": folder_hash(s.folder), "layer": s.layer} for s in sides},
            "n_triples": len(triples), "data": stable_hash([[t["prompt"], t["chosen"], t["rejected"]] for t in triples]),
            "sparsifier": sparsifier_key(cfg.steer), "density": DENSITY}


def stored_key(map_dir: Path) -> dict | None:
    manifest = json.loads((map_dir / MANIFEST).read_text())
    return manifest.get("key") if manifest.get("stage") == STAGE else None


def save_map(map_dir: Path, cmap: ConditionalMap) -> Path:
    """The map's tensors, written under a temporary name and renamed (the manifest comes after, by the caller)."""
    from safetensors.torch import save_file

    path = map_dir / MAP_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file(cmap.tensors(), str(tmp))
    tmp.replace(path)
    return path


def save_densities(map_dir: Path, G: torch.Tensor, D: torch.Tensor) -> Path:
    """The per-triple densities the map was formed from, G [N, m_in] and D [N, m_out], each as CSR over the triples
    (``g.*`` / ``drho.*``, the layout of ``map.safetensors``); the static baseline and the audit read them."""
    from safetensors.torch import save_file

    tensors = {f"{name}.{k}": v for name, X in (("g", G), ("drho", D))
               for k, v in ConditionalMap.from_dense(X).tensors().items()}
    path = map_dir / DENSITIES
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    return path


def load_densities(map_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(G [N, m_in], D [N, m_out]) of a map folder, dense."""
    from safetensors.torch import load_file

    path = Path(map_dir) / DENSITIES
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the map was built before densities were stored; run "
                                "`sparserm steer build` on the folder again (the same key rebuilds it)")
    t = load_file(str(path))
    return tuple(ConditionalMap.from_tensors({k: t[f"{name}.{k}"] for k in ("indptr", "indices", "values", "m_out")})
                 .dense() for name in ("g", "drho"))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another disk, or links refused
        shutil.copy2(src, dst)


def bundle_saes(map_dir: Path, sides: tuple[SAESide, ...]) -> tuple[SAESide, ...]:
    """Each side's SAE folder placed at ``map_dir/saes/<side>`` (a stale one there replaced); the sides with their
    folder named relative to ``map_dir``, as the manifest keeps them."""
    out = []
    for side in sides:
        rel = f"{SAES}/{side.side}"
        dst = map_dir / rel
        if Path(side.folder).resolve() != dst.resolve():
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(side.folder, tmp, copy_function=_link_or_copy)
            shutil.rmtree(dst, ignore_errors=True)
            tmp.replace(dst)
        out.append(replace(side, folder=rel))
    return tuple(out)


@dataclass
class SteeringMap:
    """A loaded map folder: the map, the config it was built with, and both SAE sides."""

    cmap: ConditionalMap
    cfg: Config
    input: SAESide
    output: SAESide
    key: dict
    folder: Path

    @property
    def n_triples(self) -> int:
        return int(self.key["n_triples"])


def load_map(map_dir: str | Path) -> SteeringMap:
    """The map of ``map_dir`` (a folder, or a storage URI pulled into this node's mirror); :class:`StaleArtifactError`
    when an SAE folder it names changed since."""
    from safetensors.torch import load_file

    from sparserm.storage import fetched

    map_dir = fetched(map_dir)
    if not (map_dir / MANIFEST).is_file() or not (map_dir / MAP_FILE).is_file():
        raise FileNotFoundError(f"{map_dir} holds no steering map ({MANIFEST} and {MAP_FILE}); build one with "
                                "`sparserm steer build`")
    manifest = json.loads((map_dir / MANIFEST).read_text())
    if manifest.get("stage") != STAGE:
        raise StaleArtifactError(f"{map_dir}/{MANIFEST} is a {manifest.get('stage')!r} manifest, not a steering map's")
    key, info = manifest["key"], manifest["map"]
    sides = tuple(SAESide(**{**info[f"{s}_sae"], "folder": str((map_dir / info[f"{s}_sae"]["folder"]).resolve())})
                  for s in ("input", "output"))  # relative to the map folder (a map of before: absolute)
    check_key({s: key[s] for s in ("input", "output")},
              {s.side: {"sae": folder_hash(s.folder), "layer": s.layer} for s in sides},
              f"steering map {map_dir} (its SAE folders)")
    cmap = ConditionalMap.from_tensors(load_file(str(map_dir / MAP_FILE)))
    if (cmap.m_in, cmap.m_out) != (sides[0].d_sae, sides[1].d_sae):
        raise StaleArtifactError(f"steering map {map_dir}: a {cmap.m_in} x {cmap.m_out} map for SAEs of widths "
                                 f"{sides[0].d_sae} and {sides[1].d_sae}")
    return SteeringMap(cmap, build(Config, manifest["config"]), sides[0], sides[1], key, map_dir)
