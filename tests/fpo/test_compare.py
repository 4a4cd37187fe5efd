"""``sparserm fpo`` end to end on a tiny random model, SAE and RM: SimPO and FPO trained on the same pairs and
steps, the base and both adapters measured, FPO minus each other policy with paired intervals, and a rerun on
the same folder that recomputes nothing."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from sparserm.config import load_config

METHODS = ("simpo", "fpo")


@pytest.fixture(scope="module")
def parts(tiny_model_dir, tmp_path_factory):
    from sparserm.testing import build_tiny_rm, build_tiny_sae

    root = tmp_path_factory.mktemp("fpo-compare")
    return {"rm": str(build_tiny_rm(root / "rm", model_dir=tiny_model_dir)),
            "sae": str(build_tiny_sae(root / "sae", d_in=64, width=128, layer=2))}


def _cfg(tiny_model_dir, cache_dir, shared_data, *extra):
    return load_config(None, [
        f"model.name={tiny_model_dir}", f"run.cache_dir={cache_dir}", "align.train.epochs=1", "align.train.lr=5e-3",
        "align.train.batch_size=4", "align.train.micro_batch_size=2", "align.generate.max_new_tokens=8",
        "align.generate.max_prompt_tokens=64", "align.loss.fpo_k=8", "align.reference_cache.batch_size=4",
        f"fpo.methods=[{', '.join(METHODS)}]", "fpo.train_pairs=8", "fpo.heldout_pairs=6", "fpo.entropy_prompts=3",
        "fpo.winrate_prompts=4", "fpo.mc_questions=3", "fpo.bootstrap=200",
        f"data.sources=[{{path: {shared_data}/hh_rlhf_harmless.jsonl.gz, max_pairs: 300}}, "
        f"{{path: {shared_data}/truthfulqa.csv, max_per_prompt: 2, max_pairs: 300}}]", *extra])


def _recomputed_accuracy(cfg, adapter: str, pairs: list[dict]) -> list[float]:
    """Per pair, 1 when the adapter's mean log-prob of chosen is above rejected's: a batched forward per pair
    (``response_logprobs``), not the evaluator's KV-cached ``group_logprobs``."""
    from peft import PeftModel

    from sparserm.align.logprobs import encode_batch, response_logprobs
    from sparserm.model.backbone import load_causal_lm
    from sparserm.model.text import encode_group

    model, tok = load_causal_lm(cfg.model, cfg.run.cache_dir, torch.device("cpu"))
    model = PeftModel.from_pretrained(model, adapter).eval()
    g = cfg.align.generate
    out = []
    with torch.no_grad():
        for p in pairs:
            grp = encode_group(tok, p["prompt"], [p["chosen"], p["rejected"]], g.max_prompt_tokens + g.max_new_tokens)
            lp, _ = response_logprobs(model, encode_batch([(grp.prefix, s) for s in grp.suffixes], tok.pad_token_id),
                                      average=True)
            out.append(1.0 if lp[0] > lp[1] else 0.0)
    return out


def test_fpo_compare_end_to_end_and_rerun(tiny_model_dir, cache_dir, shared_data, parts, ray_session, tmp_path):
    from sparserm.fpo.compare import compare_data, run_fpo_compare

    cfg = _cfg(tiny_model_dir, cache_dir, shared_data, f"align.rm_dir={parts['rm']}",
               f"align.loss.fpo_sae_dir={parts['sae']}")
    out = tmp_path / "fpo"
    report = run_fpo_compare(cfg, out)

    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["base", *METHODS]
    vocab = json.loads((Path(tiny_model_dir) / "config.json").read_text())["vocab_size"]
    for name, r in rows.items():
        for m in ("accuracy", "win_rate", "mc1", "mc2"):
            assert 0.0 <= r[m] <= 1.0, (name, m, r[m])
        assert 0.0 < r["entropy"] <= math.log(vocab) + 1e-6
        assert (r["n_heldout_pairs"], r["n_entropy_prompts"], r["n_winrate_prompts"], r["n_questions"]) == (6, 3, 4, 3)
    assert rows["base"]["win_rate"] == 0.5
    for name in METHODS:  # the same pairs and steps for every method, from the trainer's history
        r = rows[name]
        assert r["steps"] == 2 and r["train_seconds"] > 0 and math.isfinite(r["train_loss"])
        for k in ("peak_rss_mb_above_baseline", "seconds_per_step", "cpu_seconds_per_step"):
            assert r[k] > 0, (name, k)
        assert r["peak_gpu_mb"] is None  # no GPU here
    assert rows["simpo"]["beta"] == 2.0 and rows["fpo"]["beta"] == 0.1  # each objective's own default
    keys = [json.loads((out / m / "train.json").read_text())["key"] for m in METHODS]
    assert keys[0]["pairs"] == keys[1]["pairs"] and keys[0]["train"] == keys[1]["train"]
    assert report["setup"]["sae"]["dir"] == str(Path(parts["sae"]).resolve()) and report["setup"]["sae"]["layer"] == 2

    # accuracy of one method equals a recomputation on the same held-out pairs
    ev = json.loads((out / "fpo" / "eval.json").read_text())
    data = compare_data(cfg)
    assert len(data.train) == 8 and not {p["prompt"] for p in data.train} & {p["prompt"] for p in data.heldout}
    redo = _recomputed_accuracy(cfg, str(out / "fpo" / "adapter"), data.heldout)
    assert ev["per_item"]["accuracy"] == redo and rows["fpo"]["accuracy"] == pytest.approx(sum(redo) / len(redo))

    # FPO minus every other policy on every per-item metric, each interval bracketing its difference
    diffs = report["paired_differences"]
    assert {(d["metric"], d["baseline"]) for d in diffs} == {
        (m, b) for m in ("accuracy", "entropy", "win_rate", "mc1", "mc2") for b in ("base", "simpo")}
    for d in diffs:
        assert d["lo"] <= d["diff"] <= d["hi"]
        assert d["diff"] == pytest.approx(rows["fpo"][d["metric"]] - rows[d["baseline"]][d["metric"]])
    md = (out / "fpo.md").read_text()
    for name in rows:
        assert f"| {name} |" in md
    assert "paired bootstrap" in md and "predictive entropy" in md
    assert json.loads((out / "manifest.json").read_text())["stage"] == "fpo"

    # a rerun on the same folder trains and evaluates nothing again
    done = {p: os.stat(p).st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.name not in ("fpo.json", "fpo.md", "manifest.json")}
    again = run_fpo_compare(cfg, out)
    assert {p: os.stat(p).st_mtime_ns for p in done} == done
    assert again["rows"] == report["rows"] and again["paired_differences"] == diffs


def test_fpo_sae_defaults_to_the_reward_models(tiny_model_dir, cache_dir, shared_data, parts, tmp_path):
    from sparserm.fpo.compare import with_sae

    cfg = _cfg(tiny_model_dir, cache_dir, shared_data)
    with pytest.raises(ValueError, match="align.loss.fpo_sae_dir"):  # the tiny RM records no SAE folder
        with_sae(cfg, parts["rm"])
    rm = tmp_path / "rm"
    rm.mkdir()
    for f in Path(parts["rm"]).iterdir():
        if f.is_file():
            (rm / f.name).write_bytes(f.read_bytes())
    meta = json.loads((rm / "rm.json").read_text())
    (rm / "rm.json").write_text(json.dumps({**meta, "sae": {**meta["sae"], "path": parts["sae"]}}))
    resolved, source = with_sae(cfg, str(rm))
    assert resolved.align.loss.fpo_sae_dir == parts["sae"] and str(rm) in source
    given, source = with_sae(_cfg(tiny_model_dir, cache_dir, shared_data, "align.loss.fpo_sae_dir=/elsewhere"), str(rm))
    assert given.align.loss.fpo_sae_dir == "/elsewhere" and source == "align.loss.fpo_sae_dir"
    plain, source = with_sae(_cfg(tiny_model_dir, cache_dir, shared_data, "fpo.methods=[dpo, simpo]"), parts["rm"])
    assert plain.align.loss.fpo_sae_dir is None and source == "unused"
