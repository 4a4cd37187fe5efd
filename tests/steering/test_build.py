"""``sparserm steer build`` on the tiny model: the map and its manifest, equal to an independent computation;
reuse, refusal of another key, and bad triples named by row."""
import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from sparserm.data import DataError
from sparserm.manifest import StaleArtifactError
from sparserm.steering.build import build_map
from sparserm.steering.store import MAP_FILE, load_map


def independent_map(cfg, rows):
    """A from separate forwards of the full model per text (hooks on both blocks), not the packed pass."""
    from sparserm.align.pair_forward import residual_after
    from sparserm.model.backbone import load_causal_lm
    from sparserm.model.text import encode_group
    from sparserm.sae.autoencoder import SparseAutoencoder
    from sparserm.steering.conditional_map import activation_density, conditional_difference_map, sparsify

    model, tok = load_causal_lm(cfg.model, cfg.run.cache_dir, torch.device("cpu"))
    sae_in, sae_out = SparseAutoencoder.load(cfg.steer.input_sae_dir), SparseAutoencoder.load(cfg.steer.output_sae_dir)
    gs, drhos = [], []
    for r in rows:
        group = encode_group(tok, r["prompt"], [r["chosen"], r["rejected"]], cfg.model.max_tokens,
                             cfg.model.chat_template)
        n, rho = len(group.prefix), []
        for j in range(2):
            with torch.no_grad(), residual_after(model, 1) as h_in, residual_after(model, 2) as h_out:
                model(input_ids=torch.tensor([group.sequence(j)]))
            if j == 0:
                gs.append(activation_density(sae_in.encode(h_in["h"][0, :n])))
            rho.append(activation_density(sae_out.encode(h_out["h"][0, n:])))
        drhos.append(rho[0] - rho[1])
    return sparsify(conditional_difference_map(torch.stack(gs), torch.stack(drhos)), cfg.steer).dense()


def test_build_writes_the_map_and_its_manifest(steer_map, steer_config, tiny_saes, triples_file):
    from sparserm.steering.sources import load_triples

    cfg = steer_config()
    manifest = json.loads((steer_map / "manifest.json").read_text())
    key, info = manifest["key"], manifest["map"]
    rows = load_triples(cfg).rows
    assert 0 < len(rows) < 14 and info["n_triples"] == key["n_triples"] == len(rows)  # train split only
    assert key["input"]["layer"] == 1 and key["output"]["layer"] == 2
    assert (info["input_sae"]["folder"], info["output_sae"]["folder"]) == ("saes/input", "saes/output")
    assert info["output_sae"]["d_sae"] == 128
    assert key["sparsifier"] == {"name": "top_per_row", "top_per_row": 16}
    assert key["model"]["name"] == cfg.model.name and str(triples_file) in manifest["inputs"]
    assert manifest["seed"] == 0 and "torch" in manifest["versions"] and "sae-lens" in manifest["versions"]
    smap = load_map(steer_map)
    assert (smap.cmap.m_in, smap.cmap.m_out) == (128, 128) and 0 < smap.cmap.nnz <= 128 * 16
    assert int(smap.cmap.indptr.diff().max()) <= 16
    assert_close(smap.cmap.dense(), independent_map(cfg, rows), rtol=1e-5, atol=1e-7)


def test_the_map_folder_holds_its_saes_and_loads_wherever_it_is_copied(steer_map, tiny_saes, tmp_path):
    import shutil

    from sparserm.manifest import folder_hash

    for side, src in zip(("input", "output"), tiny_saes):  # the SAEs the map was built from, in its folder
        assert folder_hash(steer_map / "saes" / side) == folder_hash(src)
    moved = shutil.copytree(steer_map, tmp_path / "elsewhere")
    smap = load_map(moved)
    assert Path(smap.input.folder) == (moved / "saes" / "input").resolve() and smap.folder == moved
    assert Path(smap.output.folder) == (moved / "saes" / "output").resolve()
    assert torch.equal(smap.cmap.dense(), load_map(steer_map).cmap.dense())
    cfg_file = moved / "saes" / "output" / "cfg.json"  # a copy (copytree copies): the built map is untouched
    cfg_file.write_text(cfg_file.read_text().replace("{", '{"edited": 1, ', 1))
    with pytest.raises(StaleArtifactError, match="output"):
        load_map(moved)


def test_rerun_reuses_the_map_and_a_changed_setting_is_refused_naming_it(steer_map, steer_config, monkeypatch):
    import sparserm.steering.build as build

    def no_pass(*args, **kwargs):
        raise AssertionError("the model pass ran again")

    monkeypatch.setattr(build, "density_pass", no_pass)
    before = (steer_map / MAP_FILE).stat().st_mtime_ns
    assert build_map(steer_config("steer.alpha=0.7", "steer.num_actors=2"), steer_map, progress=False) == steer_map
    assert (steer_map / MAP_FILE).stat().st_mtime_ns == before  # decode-time and placement settings: same map
    with pytest.raises(StaleArtifactError, match=r"differs in: sparsifier\.top_per_row"):
        build_map(steer_config("steer.top_per_row=5"), steer_map, progress=False)
    with pytest.raises(StaleArtifactError, match=r"differs in: .*output\.layer"):
        build_map(steer_config("steer.output_layer=3"), steer_map, progress=False)


def test_bad_triples_are_named_by_row(tmp_path, steer_config):
    from sparserm.steering.sources import load_triples

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi there?", "chosen": "Hello.", "rejected": "Go away."}) + "\n"
                   + json.dumps({"prompt": "How are you?", "rejected": "Bad."}) + "\n"
                   + json.dumps({"prompt": "What now?", "chosen": "  ", "rejected": "Nothing."}) + "\n")
    cfg = steer_config(f"steer.data=[{{path: '{bad}'}}]", "data.eval_fraction=0.01")
    with pytest.raises(DataError, match=r"2 bad triple.*row bad\.jsonl:1: missing_field \(field 'chosen' is missing\)"
                                        r".*row bad\.jsonl:2: empty_response.*steer\.on_bad_row=skip"):
        build_map(cfg, tmp_path / "map", progress=False)
    kept = load_triples(steer_config(f"steer.data=[{{path: '{bad}'}}]", "data.eval_fraction=0.01",
                                     "steer.on_bad_row=skip"))
    assert [r["row_id"] for r in kept.rows] == ["bad.jsonl:0"] and len(kept.rejects) == 2


def test_only_the_part_of_the_data_read_is_checked(tmp_path, steer_config):
    from sparserm.steering.sources import load_triples

    rows = [{"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No."} for i in range(40)]
    path = tmp_path / "late_bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"prompt": "Q?", "chosen": ""}) + "\n")
    got = load_triples(steer_config(f"steer.data=[{{path: '{path}'}}]", "steer.max_triples=5"))
    assert len(got.rows) == 5 and not got.rejects  # the bad last line was never read
    with pytest.raises(DataError, match="late_bad.jsonl:40"):
        load_triples(steer_config(f"steer.data=[{{path: '{path}'}}]", "steer.max_triples=0"))


def test_cli_build_prints_the_folder_and_refuses_a_mismatch(tmp_path, steer_overrides, steer_map, capsys):
    import shutil

    from sparserm.cli import main

    out = tmp_path / "copy"
    shutil.copytree(steer_map, out)
    assert main(["steer", "build", *steer_overrides, "--output-dir", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out) and json.loads(lines[-2])["m_in"] == 128
    assert (out / "audit.md").is_file() and json.loads((out / "audit.json").read_text())["latents"]  # audited too
    assert main(["steer", "build", *steer_overrides, "steer.sparsifier=threshold", "--output-dir", str(out)]) == 1
    assert "sparsifier.name" in capsys.readouterr().err
    assert main(["steer", "build", *steer_overrides, "steer.input_sae_dir=/nonexistent", "--output-dir",
                 str(out)]) == 2
    assert "steer.input_sae_dir" in capsys.readouterr().err
