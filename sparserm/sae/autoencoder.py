"""One SAE interface over every source: a sae-lens registry release, a local sae-lens folder, or an SAE that
sparserm trained (saved as a sae-lens folder plus ``sparserm_sae.json``). Everything a caller sees is in
the raw residual space: encode takes raw states, decode returns raw states, W_dec rows are raw directions.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

META_FILE = "sparserm_sae.json"


class SAELoadError(RuntimeError):
    pass


class SparseAutoencoder:
    def __init__(self, sae, *, source: str, layer: int | None = None, release: str | None = None,
                 sae_id: str | None = None, neuronpedia_id: str | None = None, path: str | None = None):
        self.sae = sae.eval()
        self.source, self.layer, self.release, self.sae_id = source, layer, release, sae_id
        self.neuronpedia_id, self.path = neuronpedia_id, path

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def device(self) -> torch.device:
        return self.sae.W_dec.device

    @property
    def W_dec(self) -> torch.Tensor:
        """[d_sae, d_in] decoder rows d_j."""
        return self.sae.W_dec

    def to(self, device) -> "SparseAutoencoder":
        self.sae.to(device)
        return self

    @torch.no_grad()
    def encode(self, h: torch.Tensor) -> torch.Tensor:
        dtype = self.sae.W_dec.dtype
        return self.sae.encode(h.to(self.device, dtype)).float()

    @torch.no_grad()
    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(f.to(self.device, self.sae.W_dec.dtype)).float()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "SparseAutoencoder":
        from sae_lens import SAE

        path = Path(path)
        if not (path / "cfg.json").is_file():
            raise SAELoadError(f"{path} is not a sae-lens SAE folder (no cfg.json)")
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
        sae = SAE.load_from_disk(str(path), device=str(device))
        return cls(sae, source=meta.get("source", "local"), layer=meta.get("layer"), release=meta.get("release"),
                   sae_id=meta.get("sae_id"), neuronpedia_id=meta.get("neuronpedia_id"), path=str(path))


def registry_entry(release: str, sae_id: str):
    """sae-lens' registry entry of ``release`` (no download); ``SAELoadError`` naming an unknown release or id."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise SAELoadError(f"sae.release={release!r} is not in sae-lens' registry")
    entry = directory[release]
    if sae_id not in entry.saes_map:
        raise SAELoadError(f"sae.sae_id={sae_id!r} is not in release {release!r} "
                           f"(e.g. {', '.join(list(entry.saes_map)[:3])})")
    return entry


def load_registry(release: str, sae_id: str, device: str | torch.device = "cpu") -> SparseAutoencoder:
    from sae_lens import SAE

    entry = registry_entry(release, sae_id)
    try:
        sae = SAE.from_pretrained(release, sae_id, device=str(device))
    except Exception as exc:  # network, hub auth, missing files: say which SAE could not be had
        raise SAELoadError(f"could not load SAE {release}/{sae_id} from the hub: {exc}") from exc
    sae = sae[0] if isinstance(sae, tuple) else sae
    npid = (entry.neuronpedia_id or {}).get(sae_id) if hasattr(entry, "neuronpedia_id") else None
    layer = getattr(getattr(sae.cfg, "metadata", None), "hook_layer", None)
    return SparseAutoencoder(sae, source="registry", layer=layer, release=release, sae_id=sae_id, neuronpedia_id=npid)


def load_sae(cfg, device: str | torch.device = "cpu", trained_dir: str | Path | None = None) -> SparseAutoencoder:
    """The SAE named by an ``SAEConfig``: registry release, local folder, or the trained folder given."""
    if cfg.source == "registry":
        return load_registry(cfg.release, cfg.sae_id, device)
    path = trained_dir if cfg.source == "train" else cfg.path
    if path is None:
        raise SAELoadError(f"sae.source={cfg.source!r} needs a folder (sae.path, or a trained SAE)")
    return SparseAutoencoder.load(path, device)
