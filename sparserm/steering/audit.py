"""The audit report of a map, ``audit.md`` / ``audit.json`` beside it (``steer build`` writes it; ``steer audit
MAP_DIR`` again): the output latents the map moves most, each with its top-activating snippets from the data.

Ranking: an output latent j's mass is ``sum_i |A_ij|`` over the sparsified map; its selection count is how many
of the build prompts select it (the steering vector of each build triple's g under the map's ``steer`` settings,
from ``densities.safetensors``), with the sign of its mean score (whether the map pushes it up or down) and the
input latents feeding it most. The ``steer.audit_latents`` largest by mass are listed.

Snippets: one forward of the backbone cut after the output block over the build triples (the prompt once, both
responses packed after it, as the build), the output SAE's activations of the listed latents at every response
token; per latent the ``steer.audit_snippets`` responses where it peaks highest, each shown as ``CONTEXT`` tokens
either side of the peak token, which is marked ``[[ ]]``.

Neuronpedia: where the output SAE came from a registry release (``steer.output_sae_registry``), each latent links
to ``https://www.neuronpedia.org/{neuronpedia_id}/{latent}``, ``neuronpedia_id`` being sae-lens' registry entry for
the SAE (e.g. ``gemma-2-2b/24-gemmascope-res-16k``); nothing is fetched.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sparserm.config import replace
from sparserm.manifest import write_json

CONTEXT = 6  # tokens either side of a snippet's peak
NEURONPEDIA = "https://www.neuronpedia.org/{id}/{latent}"


def column_mass(cmap) -> torch.Tensor:
    """``sum_i |A_ij|`` [m_out]."""
    return torch.zeros(cmap.m_out).index_add_(0, cmap.indices, cmap.values.abs())


def selections(G: torch.Tensor, cmap, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(how many prompts select each output latent [m_out], the sum of its scores over them [m_out])."""
    from sparserm.steering.vector import steering_vector

    count, score = torch.zeros(cmap.m_out), torch.zeros(cmap.m_out)
    for g in G:
        v = steering_vector(g, cmap, settings)
        count[v.latents] += 1
        score[v.latents] += v.scores
    return count, score


def feeders(cmap, latent: int, k: int = 3) -> list[dict]:
    """The ``k`` input latents with the largest |A_ij| into output latent ``latent``."""
    rows = torch.repeat_interleave(torch.arange(cmap.m_in), cmap.indptr.diff())
    at = (cmap.indices == latent).nonzero().flatten()
    order = at[torch.sort(cmap.values[at].abs(), descending=True, stable=True).indices[:k]]
    return [{"input_latent": int(rows[i]), "A": round(float(cmap.values[i]), 6)} for i in order]


def _snippet(tok, ids: list[int], pos: int) -> str:
    lo, hi = max(0, pos - CONTEXT), pos + CONTEXT + 1
    return (tok.decode(ids[lo:pos]) + "[[" + tok.decode(ids[pos:pos + 1]) + "]]" + tok.decode(ids[pos + 1:hi])
            ).replace("\n", "\\n").replace("`", "'")


@torch.no_grad()
def top_snippets(smap, triples: list[dict], latents: list[int], n: int) -> dict[int, list[dict]]:
    """Per latent, its ``n`` highest peaks over the triples' responses (one per response); ``{}`` for none
    (a map whose threshold kept no entry)."""
    if not latents:
        return {}
    from sparserm.model.backbone import load_backbone, resolve_device
    from sparserm.model.forward import packed_states
    from sparserm.model.text import encode_group
    from sparserm.sae.autoencoder import SparseAutoencoder

    cfg, out = smap.cfg, smap.output
    backbone = load_backbone(replace(cfg.model, layer=out.layer, extra_layers=()), cfg.run.cache_dir,
                             resolve_device(cfg.model.device))
    sae = SparseAutoencoder.load(out.folder, backbone.device)
    tok, m, ids = backbone.tokenizer, cfg.model, torch.tensor(latents, dtype=torch.long)
    peaks: dict[int, list[dict]] = {j: [] for j in latents}
    step = cfg.steer.batch_size
    for start in range(0, len(triples), step):
        chunk = triples[start:start + step]
        groups = [encode_group(tok, t["prompt"], [t["chosen"], t["rejected"]], m.max_tokens, m.chat_template)
                  for t in chunk]
        states = packed_states(backbone, groups, share_prefix=True, max_batch_tokens=cfg.features.max_batch_tokens)
        for t, (group, texts) in enumerate(zip(groups, states)):
            for side, suffix, text in zip(("chosen", "rejected"), group.suffixes, texts):
                a = sae.encode(text.states[out.layer][len(group.prefix):])[:, ids].cpu()  # [T, K]
                best, pos = a.max(0)
                for j, v, p in zip(latents, best.tolist(), pos.tolist()):
                    if v > 0:
                        peaks[j].append({"activation": round(v, 4), "triple": start + t, "side": side,
                                         "row_id": chunk[t]["row_id"], "snippet": _snippet(tok, suffix, p)})
    return {j: sorted(p, key=lambda x: -x["activation"])[:n] for j, p in peaks.items()}


def write_audit(map_dir: str | Path) -> Path:
    """``audit.json`` / ``audit.md`` in ``map_dir``; returns the .md."""
    from sparserm.manifest import StaleArtifactError, stable_hash
    from sparserm.sae.autoencoder import META_FILE
    from sparserm.steering.sources import load_triples
    from sparserm.steering.store import load_densities, load_map
    from sparserm.steering.vector import SteerSettings

    map_dir = Path(map_dir)
    smap = load_map(map_dir)
    s = smap.cfg.steer
    triples = load_triples(smap.cfg).rows
    if stable_hash([[t["prompt"], t["chosen"], t["rejected"]] for t in triples]) != smap.key["data"]:
        raise StaleArtifactError(f"{map_dir}: the triples read now are not the ones the map was built from")
    G, _ = load_densities(map_dir)
    mass = column_mass(smap.cmap)
    count, score = selections(G, smap.cmap, SteerSettings.of(s).check())
    top = [int(j) for j in torch.sort(mass, descending=True, stable=True).indices[: s.audit_latents] if mass[j] > 0]
    snippets = top_snippets(smap, triples, top, s.audit_snippets)
    meta_file = Path(smap.output.folder) / META_FILE
    npid = json.loads(meta_file.read_text()).get("neuronpedia_id") if meta_file.is_file() else None
    latents = [{"latent": j, "mass": round(float(mass[j]), 6), "selected_by": int(count[j]),
                "direction": "up" if score[j] > 0 else "down" if score[j] < 0 else "never selected",
                "feeders": feeders(smap.cmap, j), "snippets": snippets[j],
                "neuronpedia": NEURONPEDIA.format(id=npid, latent=j) if npid else None} for j in top]
    report = {"map": str(map_dir), "n_triples": smap.n_triples, "output_layer": smap.output.layer,
              "output_sae": smap.output.folder, "neuronpedia_id": npid, "ranked_by": "sum_i |A_ij|",
              "latents": latents}
    write_json(map_dir / "audit.json", report)
    lines = [f"# Audit of the steering map {map_dir}", "",
             f"The {len(latents)} output latents (layer {smap.output.layer}) the map moves most, by their mass "
             f"sum_i |A_ij|; `selected by`: of the {smap.n_triples} build prompts, how many select the latent "
             f"(k_prompt {s.k_prompt}, k_diff {s.k_diff}); peaks in the build responses, the token marked [[ ]].", ""]
    if not latents:
        lines += ["The map has no entry, so it moves nothing: a lower `steer.threshold` or more build triples give "
                  "it some.", ""]
    for x in latents:
        link = f" ([Neuronpedia]({x['neuronpedia']}))" if x["neuronpedia"] else ""
        feed = ", ".join(f"{f['input_latent']} ({f['A']:+.4f})" for f in x["feeders"])
        lines += [f"## latent {x['latent']}{link}", "",
                  f"mass {x['mass']:.4f}, selected by {x['selected_by']} prompts, pushed {x['direction']}; "
                  f"input latents feeding it most: {feed}", ""]
        lines += [f"- {p['activation']:.3f} ({p['side']}, {p['row_id']}): `{p['snippet']}`" for p in x["snippets"]]
        lines.append("")
    path = map_dir / "audit.md"
    path.write_text("\n".join(lines))
    return path
