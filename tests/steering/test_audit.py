"""The audit report of the session's map: latents ranked by the map's mass, their selection counts, and
top-activating snippets equal to an independent forward of the full model."""
import json
from pathlib import Path

import pytest
import torch

from sparserm.steering.store import load_densities, load_map


@pytest.fixture(scope="module")
def audited(steer_map, tmp_path_factory):
    """A copy of the session's map (shared with tests/serve, which should not see files appear), audited."""
    import shutil

    from sparserm.cli import main

    folder = tmp_path_factory.mktemp("steer-audit") / "map"
    shutil.copytree(steer_map, folder)
    assert main(["steer", "audit", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def audit(audited):
    return json.loads((audited / "audit.json").read_text())


def test_latents_are_the_maps_largest_columns_by_mass(audit, audited):
    smap = load_map(audited)
    mass = smap.cmap.dense().abs().sum(0)  # independent of the CSR column sums
    listed = [x["latent"] for x in audit["latents"]]
    assert len(listed) == min(smap.cfg.steer.audit_latents, int((mass > 0).sum()))
    assert [x["mass"] for x in audit["latents"]] == pytest.approx(mass[listed].tolist(), rel=1e-5)
    assert mass[listed].min() >= mass[[j for j in range(smap.cmap.m_out) if j not in listed]].max()
    assert audit["neuronpedia_id"] is None and all(x["neuronpedia"] is None for x in audit["latents"])
    for x in audit["latents"]:  # each feeder is an entry of the map's column, largest |A| first
        A = smap.cmap.dense()[:, x["latent"]]
        assert [f["A"] for f in x["feeders"]] == pytest.approx([float(A[f["input_latent"]]) for f in x["feeders"]],
                                                               abs=1e-6)
        assert abs(x["feeders"][0]["A"]) == pytest.approx(float(A.abs().max()), abs=1e-6)


def test_selection_counts_follow_decoding_selection(audit, audited):
    from sparserm.steering.vector import SteerSettings, steering_vector

    smap = load_map(audited)
    G, _ = load_densities(audited)
    settings = SteerSettings.of(smap.cfg.steer)
    picks = [set(steering_vector(g, smap.cmap, settings).latents.tolist()) for g in G]
    for x in audit["latents"]:
        assert x["selected_by"] == sum(x["latent"] in p for p in picks)
        assert x["direction"] in ("up", "down") if x["selected_by"] else x["direction"] == "never selected"


def test_snippets_peak_where_an_independent_forward_says(audit, audited):
    from sparserm.align.pair_forward import residual_after
    from sparserm.model.backbone import load_causal_lm
    from sparserm.model.text import encode_group
    from sparserm.sae.autoencoder import SparseAutoencoder
    from sparserm.steering.sources import load_triples

    smap = load_map(audited)
    cfg = smap.cfg
    model, tok = load_causal_lm(cfg.model, cfg.run.cache_dir, torch.device("cpu"))
    sae = SparseAutoencoder.load(smap.output.folder)
    triples = load_triples(cfg).rows
    checked = 0
    for x in audit["latents"][:3]:
        acts = [p["activation"] for p in x["snippets"]]
        assert acts == sorted(acts, reverse=True) and len(acts) <= cfg.steer.audit_snippets
        for p in x["snippets"]:
            t = triples[p["triple"]]
            assert p["row_id"] == t["row_id"]
            group = encode_group(tok, t["prompt"], [t["chosen"], t["rejected"]], cfg.model.max_tokens,
                                 cfg.model.chat_template)
            j = ("chosen", "rejected").index(p["side"])
            with torch.no_grad(), residual_after(model, smap.output.layer) as h:
                model(input_ids=torch.tensor([group.sequence(j)]))
            a = sae.encode(h["h"][0, len(group.prefix):])[:, x["latent"]]
            assert p["activation"] == pytest.approx(float(a.max()), abs=1e-3)
            peak = tok.decode(group.suffixes[j][int(a.argmax())]).replace("\n", "\\n")
            assert f"[[{peak}]]" in p["snippet"]
            checked += 1
    assert checked > 0
    assert Path(audited, "audit.md").read_text().count("## latent") == len(audit["latents"])


def test_a_map_with_no_entry_has_no_latents_to_audit():
    # a threshold that kept no entry: the empty latent list indexed the SAE's codes with a float tensor
    from sparserm.steering.audit import top_snippets

    assert top_snippets(smap=None, triples=[{"prompt": "p", "chosen": "a", "rejected": "b"}], latents=[], n=3) == {}
