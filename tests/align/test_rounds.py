"""The alignment job end to end on a tiny random model and RM: two rounds, both filters, killed in round 2
and resumed there without redoing finished work."""
import json
import os
from pathlib import Path

import pytest

from sparserm.config import load_config
from sparserm.manifest import read_jsonl


@pytest.fixture(scope="module")
def job_cfg(tiny_model_dir, cache_dir, shared_data, tmp_path_factory):
    from sparserm.testing import build_tiny_rm

    rm = build_tiny_rm(tmp_path_factory.mktemp("align-rm") / "rm", model_dir=tiny_model_dir)
    return load_config(None, [
        f"model.name={tiny_model_dir}", f"run.cache_dir={cache_dir}", f"align.rm_dir={rm}", "align.rounds=2",
        "align.train.epochs=2", "align.train.batch_size=4", "align.train.micro_batch_size=2", "align.generate.max_new_tokens=8",
        "align.generate.max_prompt_tokens=96", "align.prompts_per_round=8", "align.eval.mc_questions=3",
        "align.eval.hh_pairs=3", "align.eval.winrate_prompts=4",
        f"data.sources=[{{path: {shared_data}/hh_rlhf_harmless.jsonl.gz}}, {{path: {shared_data}/truthfulqa.csv}}]"])


def test_job_resumes_in_round_two(job_cfg, ray_session, tmp_path, monkeypatch):
    from sparserm.align.cli import run_align

    monkeypatch.chdir(tmp_path)
    out = Path("align")  # relative, as a user types it: workers must still find the adapters
    first = run_align(job_cfg, out, stop_after=(2, "rm"))
    assert first["stopped"]
    assert json.loads((out / "state.json").read_text()) == {"rm": 1, "none": 1}
    assert not (out / "rm" / "round_2" / "metrics.json").exists()
    finished = sorted(p for p in out.rglob("*") if p.is_file() and "round_1" in p.parts)
    stamps = {p: os.stat(p).st_mtime_ns for p in finished}

    second = run_align(job_cfg, out)
    assert not second["stopped"]
    assert {p: os.stat(p).st_mtime_ns for p in finished} == stamps  # round 1 untouched
    hist = json.loads((out / "rm" / "round_2" / "train.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2]

    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["round"] for r in rows["rm"]] == [0, 1, 2] and [r["round"] for r in rows["none"]] == [0, 1, 2]
    for r in rows["rm"][1:] + rows["none"][1:]:
        assert 0.0 <= r["mc1"] <= 1.0 and 0.0 <= r["mc2"] <= 1.0 and 0.0 <= r["harmless"] <= 1.0
        assert 0.0 <= r["rm_win_rate"] <= 1.0
    assert rows["rm"][0]["rm_win_rate"] == 0.5
    assert (out / "metrics.png").stat().st_size > 0 and "| 2 | none |" in (out / "report.md").read_text()

    # round 1 pairs come from the base policy and are shared; the filter keeps exactly the RM-agreeing ones
    cands = read_jsonl(out / "round_1" / "candidates.jsonl")
    rm_kept = read_jsonl(out / "rm" / "round_1" / "pairs.jsonl")
    assert [p["prompt"] for p in rm_kept] == [p["prompt"] for p in cands if p["score_chosen"] >= p["score_rejected"]]
    assert len(read_jsonl(out / "none" / "round_1" / "pairs.jsonl")) == len(cands)
    round2 = {p["prompt"] for p in read_jsonl(out / "rm" / "round_2" / "candidates.jsonl")}
    assert round2 and not round2 & {p["prompt"] for p in cands}  # each round draws fresh prompts
    assert json.loads((out / "manifest.json").read_text())["stage"] == "align"
    assert {r["rm_agreement"] for r in rows["rm"][1:]} <= {r["rm_agreement"] for r in rows["none"][1:]} | {
        json.loads((out / "rm" / "round_2" / "filter.json").read_text())["rm_agreement"]}
    assert rows["none"][1]["kept_share"] == 1.0
    diffs = json.loads((out / "report.json").read_text())["paired_differences"]
    assert {(d["round"], d["metric"]) for d in diffs} == {(r, m) for r in (1, 2)
                                                          for m in ("mc1", "mc2", "harmless", "rm_win_rate")}
    assert all(d["lo"] <= d["diff"] <= d["hi"] for d in diffs)
    assert "paired bootstrap" in (out / "report.md").read_text()

    # the FLOP/s each phase reached (what benchmarks/alignment_cost.py --measured costs a paper setup with), from the
    # work this run did: 4 DPO runs of 2 epochs over their kept pairs; 5 evaluations of 3 questions, 3 HH pairs and
    # 4 win-rate prompts; the seconds summed over both invocations
    from benchmarks.alignment_cost import MC_CHOICES, MC_TOKENS, measured_rates, shape_of

    rates, shape = measured_rates(out), shape_of(job_cfg.model.name)
    timings = json.loads((out / "timings.json").read_text())
    assert rates["seconds"] == {k: timings[k] for k in ("generate+label+score", "dpo", "evaluate")}
    nf, nl, t = shape.forward, shape.truncated(job_cfg.model.layer), 96 + 8
    kept = sum(len(read_jsonl(p)) for p in out.glob("*/round_*/pairs.jsonl"))
    assert kept == sum(r["n_kept"] for r in rows["rm"][1:] + rows["none"][1:])
    assert rates["flops"]["dpo"] == pytest.approx(2 * kept * (2 + 4 * 2) * nf * t)
    one_eval = 3 * MC_CHOICES * 2 * nf * MC_TOKENS + 3 * 2 * 2 * nf * t + 4 * (2 * nf * t + 2 * nl * t)
    assert rates["flops"]["evaluate"] == pytest.approx(5 * one_eval)
    generated = [json.loads(p.read_text()) for p in out.rglob("generation.json")]  # round 1 shared, 2 per filter
    assert len(generated) == 3 and rates["flops"]["generate+label+score"] > 2 * nf * sum(
        g["generated_tokens"] for g in generated)
    assert all(rates["tflop_per_s"][k] == pytest.approx(rates["flops"][k] / timings[k] / 1e12) for k in timings
               if k in rates["seconds"])
    assert rates["machine"]["cpu"]["cores"] == os.cpu_count()

    # each step's output is keyed by what produced it: an evaluation setting re-evaluates and trains nothing ...
    trained = {p: os.stat(p).st_mtime_ns for p in out.rglob("train.json")}
    eval0 = json.loads((out / "round_0" / "eval.json").read_text())
    from dataclasses import replace

    fewer = replace(job_cfg, align=replace(job_cfg.align, eval=replace(job_cfg.align.eval, winrate_prompts=2)))
    third = run_align(fewer, out)
    assert {p: os.stat(p).st_mtime_ns for p in out.rglob("train.json")} == trained
    assert json.loads((out / "round_0" / "eval.json").read_text())["key"] != eval0["key"]
    assert len(read_jsonl(out / "rm" / "round_2" / "eval_generations.jsonl")) == 2
    assert third["rows"]["rm"][2]["dpo_loss"] == rows["rm"][2]["dpo_loss"]
    # ... while pairs generated under other settings are refused, naming the field
    from sparserm.manifest import StaleArtifactError

    hotter = replace(fewer, align=replace(fewer.align, generate=replace(fewer.align.generate, temperature=0.3)))
    everything = {p: os.stat(p).st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StaleArtifactError, match="sampling.temperature"):
        run_align(hotter, out)
    # ... and so is an adapter trained under other training settings, even in a finished round
    faster = replace(fewer, align=replace(fewer.align, train=replace(fewer.align.train, lr=1e-2)))
    with pytest.raises(StaleArtifactError, match="train.lr"):
        run_align(faster, out)
    # both refused before any work: nothing evaluated again, nothing written (round 0's evaluation included)
    assert {p: os.stat(p).st_mtime_ns for p in out.rglob("*") if p.is_file()} == everything
    placed = replace(fewer, align=replace(fewer.align, train=replace(fewer.align.train, num_cpus=0.5)))
    assert not run_align(placed, out)["stopped"]  # where a worker runs is no training setting


def test_full_finetuning_is_refused_by_the_loop_naming_the_key(job_cfg, tmp_path):
    from dataclasses import replace

    from sparserm.align.rounds import AlignJob
    from sparserm.config import ConfigError

    full = replace(job_cfg, align=replace(job_cfg.align, train=replace(job_cfg.align.train, finetune="full")))
    with pytest.raises(ConfigError, match="align.train.finetune=full"):
        AlignJob(full, tmp_path / "align", job_cfg.align.rm_dir)
    assert not (tmp_path / "align").exists()  # refused before anything was written
