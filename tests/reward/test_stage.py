"""rm train / ablate / evaluate end to end on the tiny model: real Ray Data pass, real sae-lens SAE,
real Ray Train head. Checks the artifact, the API and the commands' outputs, not just that they ran."""
import json
import os
import random

import numpy as np
import pytest
import torch

from sparserm.cli import main
from sparserm.config import load_config
from sparserm.reward.model import SparseRM


def _pairs_file(path, n=60, seed=0):
    rng = random.Random(seed)
    good = ["Sure, here is a safe and helpful answer: mix flour and water.", "Paris is the capital of France.",
            "Please talk to a doctor; I can share general information."]
    bad = ["I won't help with that.", "No.", "You should wait 24 hours before filing a report."]
    rows = [{"prompt": f"Question {i}: {rng.choice(['bake bread?', 'capital of France?', 'tell me a joke'])}",
             "chosen": rng.choice(good), "rejected": rng.choice(bad)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, tiny_model_dir, ray_session):
    tmp = tmp_path_factory.mktemp("rm")
    data = _pairs_file(tmp / "pairs.jsonl")
    overrides = [f"run.cache_dir={tmp / 'cache'}", f"model.name={tiny_model_dir}", "model.layer=2",
                 "model.max_tokens=48", f"data.sources=[{{path: {data}}}]", "data.eval_fraction=0.3",
                 "sae.width=128", "sae.k=8", "sae.batch_size=256",
                 "sae.training_tokens=20000", "reward.top_k=8", "reward.hidden=16", "reward.epochs=3",
                 "reward.val_fraction=0.2"]
    out = tmp / "run"
    assert main(["rm", "train", *overrides, "--output-dir", str(out)]) == 0
    return tmp, out, overrides


def test_rm_folder_and_metrics(rm_run):
    _, out, _ = rm_run
    meta = json.loads((out / "rm" / "rm.json").read_text())
    assert meta["top_k"] == 8 and meta["layer"] == 2 and meta["pooling"] == "mean_response"
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"]["all"] <= 1.0
    assert len(metrics["history"]) == 3 and 1 <= metrics["best_epoch"] <= 3
    assert {"fvu", "fvu_all", "l0", "dead_fraction"} <= set(metrics["sae"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["reward"]["top_k"] == 8 and "torch" in manifest["versions"]
    assert manifest["machine"]["cpu"]["cores"] == os.cpu_count() and manifest["machine"]["gpus"] == [
        {"name": torch.cuda.get_device_name(i), "memory_gb": round(torch.cuda.get_device_properties(i).total_memory
                                                                   / 2**30, 1)} for i in range(torch.cuda.device_count())]
    assert (out / "report.md").is_file() and (out / "embedding.png").stat().st_size > 1000
    latents = json.loads((out / "latents.json").read_text())
    assert len(latents) == 16 and {r["favours"] for r in latents} == {"chosen", "rejected"}


def test_sae_and_head_training_are_tracked_in_the_run_folder(rm_run):
    """TensorBoard (the default), read back: the SAE's steps (20000 tokens / 256: 78) and its held-out quality at
    step 78, equal to metrics.json's; the head's steps and epochs at global steps, equal to its history."""
    from sparserm.testing import tensorboard_scalars

    _, out, _ = rm_run
    metrics = json.loads((out / "metrics.json").read_text())
    sae = tensorboard_scalars(out / "tensorboard" / "sae-layer2")
    assert {k: v for k, v in sae.items() if k.startswith("eval/")} == {
        f"eval/{k}": [(78, np.float32(v))] for k, v in metrics["sae"].items()}
    assert [s for s, _ in sae["losses/overall_loss"]] == list(range(78))
    head, hist = tensorboard_scalars(out / "train" / "head" / "tensorboard"), metrics["history"]
    n = len(hist[0]["step_loss"])
    assert head["step/loss"] == [(i + 1, np.float32(v)) for i, v in enumerate(v for h in hist for v in h["step_loss"])]
    for key in ("epoch", "train_loss", "val_loss", "val_accuracy"):
        assert head[f"epoch/{key}"] == [(n * h["epoch"], np.float32(h[key])) for h in hist]


def test_score_api_matches_cached_features(rm_run):
    tmp, out, overrides = rm_run
    from sparserm.features.stage import cache_root, prepare_data

    cfg = load_config(None, overrides)
    data = prepare_data(cfg)
    from sparserm.features.cache import ActivationCache

    table = ActivationCache(cache_root(cfg, data.checksums)).read_pooled(2)
    rm = SparseRM.load(out / "rm")
    row = data.rows[0]
    s_w, s_l = rm.score_pairs([row["prompt"]], [row["chosen"]], [row["rejected"]])
    i = int(np.flatnonzero((table.meta["row_id"] == row["row_id"]) & (table.meta["side"] == "chosen"))[0])
    assert s_w[0] == pytest.approx(rm.score_states(table.states[i:i + 1]).item(), abs=1e-4)
    single = rm.score([row["prompt"]], [row["chosen"]])
    assert single[0] == pytest.approx(s_w[0], abs=1e-4)  # untruncated: a text scores the same alone
    with pytest.raises(ValueError, match="prompts"):
        rm.score(["a", "b"], ["x"])


def test_rm_evaluate_command_counts_malformed_rows(rm_run, capsys):
    tmp, out, _ = rm_run
    f = tmp / "eval.jsonl"
    f.write_text('{"prompt": "Question: bake bread?", "chosen": "Sure, mix flour.", "rejected": "No."}\n'
                 '{"prompt": "p", "chosen": "same", "rejected": "same"}\n{broken\n'
                 '{"prompt": "q", "chosen": 5, "rejected": "x"}\n')
    assert main(["rm", "evaluate", str(out / "rm"), str(f), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_pairs"] == 1 and result["n_rejected"] == 3 and result["accuracy"] in (0.0, 1.0)
    assert main(["rm", "evaluate", str(out / "rm"), str(tmp / "missing.jsonl"), "--json"]) == 1


def test_second_run_reuses_caches_and_resumes_head_training(rm_run, monkeypatch):
    tmp, out, overrides = rm_run
    import sparserm.features.extract as extract
    import sparserm.sae.stage as sae_stage

    monkeypatch.setattr(extract, "extract_to_shards", lambda *a, **k: pytest.fail("model pass re-run"))
    monkeypatch.setattr(sae_stage, "train_sae", lambda *a, **k: pytest.fail("SAE re-trained"))
    assert main(["rm", "train", *overrides, "--output-dir", str(out)]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 3


def test_sweep_picks_layer_and_k_on_validation_from_one_pass(rm_run):
    tmp, _, overrides = rm_run
    out = tmp / "sweep"
    over = [o for o in overrides if not o.startswith("reward.epochs")] + [
        "model.extra_layers=[1]", "reward.sweep_k=[4,8]", "reward.epochs=2", "reward.sweep_folds=2"]
    before = set((tmp / "cache" / "activations").iterdir())
    assert main(["rm", "sweep", *over, "--output-dir", str(out)]) == 0
    new_caches = set((tmp / "cache" / "activations").iterdir()) - before
    assert len(new_caches) == 1  # one pass to the deepest layer serves both layers
    result = json.loads((out / "sweep.json").read_text())
    cells = {(r["layer"], r["k"]) for r in result["rows"]}
    assert cells == {(1, 4), (1, 8), (2, 4), (2, 8)}
    assert [p.name for p in (out / "train").iterdir()] == ["sweep"]  # 8 fold heads, one Ray Train run
    assert all(len(r["fold_accuracy"]) == 2 and len(r["best_epochs"]) == 2 for r in result["rows"])
    assert all(r["val_accuracy"] == pytest.approx(np.mean(r["fold_accuracy"])) for r in result["rows"])
    best = max(result["rows"], key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert result["chosen"] == {"layer": best["layer"], "k": best["k"]}
    saes = {json.loads(p.read_text()).get("layer") for p in (tmp / "cache" / "saes").glob("*/sparserm_sae.json")}
    assert {1, 2} <= saes  # an SAE per candidate layer
    assert "(chosen)" in (out / "sweep.md").read_text()


def test_ablate_fits_every_variant_per_seed_and_reports_paired_gaps(rm_run):
    tmp, _, overrides = rm_run
    out = tmp / "ablate"
    over = [o for o in overrides if not o.startswith("reward.epochs")] + ["reward.epochs=2", "reward.head_seeds=2"]
    assert main(["rm", "ablate", *over, "--output-dir", str(out)]) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert result["seeds"] == [0, 1]
    assert [p.name for p in (out / "train").iterdir()] == ["ablate"]  # 12 heads, one Ray Train run
    names = [r["name"] for r in result["rows"]]
    assert names == ["topk-margin", "random-margin", "raw_sae-margin", "dense-margin", "topk-bt", "topk-bce", "length"]
    dims = {r["name"]: r["in_dim"] for r in result["rows"]}
    assert dims["topk-margin"] == dims["random-margin"] == dims["raw_sae-margin"] == 16 and dims["dense-margin"] == 64
    for r in result["rows"][:-1]:
        assert len(r["per_seed"]) == 2 and len(r["best_epochs"]) == 2
        assert r["accuracy"]["all"] == pytest.approx(np.mean([a["all"] for a in r["per_seed"]]))
    for other in ("random", "raw_sae", "dense"):
        gap = result["sparserm_minus"][other]["all"]
        assert gap["lo"] <= gap["diff"] <= gap["hi"] and -1 <= gap["diff"] <= 1
    assert "SparseRM minus" in (out / "ablation.md").read_text()
