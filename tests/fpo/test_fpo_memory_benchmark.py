"""benchmarks/fpo_memory.py without training: its argument parsing, the overrides each run gets
(benchmarks/fpo_memory_runs.py), and the ratios, targets and last-line JSON computed from fake history rows."""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fpo_memory_bench", ROOT / "benchmarks" / "fpo_memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs_mod(bench):  # the benchmark's per-run module (bench puts the repository on sys.path)
    return importlib.import_module("benchmarks.fpo_memory_runs")


def _run(finetune, method, peak, sps, copy=False, ref_steps=0, micro=6, gpu=None):
    return {"finetune": finetune, "method": method,
            "row": {"peak_rss_mb_above_baseline": peak, "peak_gpu_mb": gpu, "seconds_per_step": sps,
                    "cpu_seconds_per_step": 2 * sps if method == "fpo" else sps,
                    "reference_copy": copy, "reference_forwards_in_steps": ref_steps, "policy_micro_batches": micro,
                    "model_forwards_in_steps": micro + (ref_steps if not copy else 0)}}


def test_defaults_and_options(bench):
    a = bench.parse_args([])
    assert a.model == "embedded" and a.finetune == ("full", "lora") and a.methods == ("dpo", "tdpo2", "simpo", "fpo")
    assert a.pairs == a.steps * a.batch_size
    a = bench.parse_args(["--model", "tiny", "--finetune", "lora", "--methods", "simpo,fpo", "--steps", "2",
                          "--batch-size", "4", "--micro-batch", "2", "--max-tokens", "64"])
    assert a.finetune == ("lora",) and a.methods == ("simpo", "fpo") and a.pairs == 8 and a.steps == 2
    a = bench.parse_args(["--pairs", "7", "--batch-size", "2", "--micro-batch", "1"])
    assert a.pairs == 7 and a.steps == 4  # --pairs sets the steps (the last one part-filled by the trainer)
    for bad in (["--methods", "dpo,ppo"], ["--finetune", "qlora"], ["--batch-size", "3", "--micro-batch", "2"],
                ["--steps", "0"], ["--max-tokens", "4"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_each_method_gets_its_settings(bench, runs_mod, tmp_path):
    a = bench.parse_args(["--max-tokens", "160", "--set", "align.train.deepspeed_stage=1"])
    ov = {m: runs_mod.run_overrides(a, m, "full", "embedded", None, str(tmp_path), False) for m in bench.METHODS}
    assert "align.train.reference_online=true" in ov["dpo"]
    assert "align.loss.name=tdpo2" in ov["tdpo2"] and "align.loss.name=simpo" in ov["simpo"]
    assert f"align.loss.fpo_sae_dir={tmp_path}" in ov["fpo"]
    for o in ov.values():
        assert "align.train.finetune=full" in o and "align.train.epochs=1" in o
        assert o[-1] == "align.train.deepspeed_stage=1"  # --set comes last
        assert "align.train.deepspeed_stage=0" in o and "align.train.gradient_checkpointing=true" in o  # defaults
        prompt = int(next(x for x in o if x.startswith("align.generate.max_prompt_tokens=")).split("=")[1])
        new = int(next(x for x in o if x.startswith("align.generate.max_new_tokens=")).split("=")[1])
        assert prompt + new == 160
    # the overrides make valid configs (the trainer's own schema)
    from sparserm.config import load_config

    for o in ov.values():
        load_config(None, o)
    assert "align.train.num_gpus=0.5" in runs_mod.run_overrides(a, "fpo", "lora", "embedded", None, "x", True)
    b = bench.parse_args(["--zero-stage", "2", "--no-gradient-checkpointing"])
    o = runs_mod.run_overrides(b, "simpo", "full", "embedded", None, None, False)
    assert "align.train.deepspeed_stage=2" in o and "align.train.gradient_checkpointing=false" in o
    assert runs_mod.random_shape("random:1024x8") == (1024, 8) and runs_mod.random_shape("tiny") == (64, 4)
    for bad in ("random:1024", "random:axb", "random:10x2"):
        with pytest.raises(ValueError, match="random:HIDDENxBLOCKS|multiple of 4"):
            runs_mod.random_shape(bad)


def test_ratios_targets_and_checks_on_fake_rows(bench):
    runs = [_run("full", "dpo", 2000.0, 3.0, copy=True, ref_steps=6), _run("full", "tdpo2", 2500.0, 3.5, True, 6),
            _run("full", "simpo", 1500.0, 2.0), _run("full", "fpo", 1560.0, 2.1),
            _run("lora", "dpo", 1000.0, 1.5, ref_steps=6), _run("lora", "tdpo2", 1100.0, 1.8, ref_steps=6),
            _run("lora", "simpo", 900.0, 1.0), _run("lora", "fpo", 1000.0, 1.3)]
    s = bench.summarize(runs, use_gpu=False)
    assert s["fpo_vs_dpo_peak_memory"] == 0.78 and s["fpo_vs_tdpo_peak_memory"] == 0.624
    assert s["fpo_vs_simpo_peak_memory"] == 1.04 and s["fpo_vs_simpo_step_time"] == 1.05
    assert s["lora_fpo_vs_simpo_peak_memory"] == 1.1111 and s["lora_fpo_vs_simpo_step_time"] == 1.3
    assert s["fpo_vs_simpo_step_cpu_time"] == 2.1 and "fpo_vs_simpo_step_cpu_time" not in s["pass"]  # reported only
    assert s["pass"]["fpo_vs_dpo_peak_memory"] and s["pass"]["fpo_vs_simpo_step_time"]
    lora = s["lora_pass_informational"]
    assert lora["lora_fpo_vs_simpo_peak_memory"] is False and lora["lora_fpo_vs_dpo_peak_memory"] is False
    assert lora["lora_fpo_vs_simpo_step_time"] is False and lora["lora_fpo_vs_tdpo_peak_memory"] is False  # 1000 / 1100
    # the targets are full fine-tuning's: LoRA's misses do not fail the run, a full fine-tuning miss does
    assert set(s["pass"]) == set(bench.TARGETS) and s["all_pass"] is True
    slow = [dict(r, row=dict(r["row"], seconds_per_step=2.5)) if (r["finetune"], r["method"]) == ("full", "fpo")
            else r for r in runs]
    t = bench.summarize(slow, use_gpu=False)
    assert t["fpo_vs_simpo_step_time"] == 1.25 and t["pass"]["fpo_vs_simpo_step_time"] is False
    assert t["all_pass"] is False
    assert s["targets"]["fpo_vs_tdpo_peak_memory"]["max"] == 0.83
    assert s["memory_metric"] == "peak_rss_mb_above_baseline" and s["history_fields_missing"] == []
    assert all(s["checks"].values())  # DPO/TDPO-2 online (a copy in full), SimPO and FPO without a reference
    json.dumps(s)  # the last line is plain JSON
    assert "peak 1560.0 MB" in bench.run_line(runs[3], False) and "4.200 CPU s/step" in bench.run_line(runs[3], False)


def test_gpu_memory_missing_fields_and_failed_runs(bench):
    runs = [_run("lora", "simpo", 9e9, 1.0, gpu=800.0), _run("lora", "fpo", 1.0, 1.0, gpu=820.0),
            {"finetune": "lora", "method": "dpo", "row": None, "error": "exit 1", "wall_s": 3.0},
            {"finetune": "lora", "method": "tdpo2", "row": {"reference_copy": False}}]
    s = bench.summarize(runs, use_gpu=True)
    assert s["memory_metric"] == "peak_gpu_mb" and s["lora_fpo_vs_simpo_peak_memory"] == 1.025  # device memory
    assert s["lora_fpo_vs_dpo_peak_memory"] is None and s["lora_pass_informational"]["lora_fpo_vs_dpo_peak_memory"] is None
    assert s["lora_fpo_vs_tdpo_peak_memory"] is None  # the row has no memory field
    assert s["fpo_vs_simpo_peak_memory"] is None  # no full fine-tuning runs
    assert s["all_pass"] is False
    assert s["history_fields_missing"] == sorted(bench.MEASURED)
    assert s["checks"]["lora_dpo"] is None and s["checks"]["lora_tdpo2"] is None
    # a full-fine-tuning DPO without a copy did not run as the comparison means
    full_dpo = _run("full", "dpo", 1.0, 1.0, copy=False, ref_steps=6)
    assert bench.method_checks([full_dpo]) == {"full_dpo": False}
    assert "FAILED" in bench.run_line(runs[2], True)


def test_cpu_info_and_pairs(bench, runs_mod):
    info = bench.cpu_info()
    assert set(info) >= {"model_name", "avx512", "amx"}
    pairs = runs_mod.synthetic_pairs(5)
    assert len(pairs) == 5 and pairs == runs_mod.synthetic_pairs(5)
    got, source = runs_mod.load_benchmark_pairs(3)
    assert len(got) == 3 and set(got[0]) == {"prompt", "chosen", "rejected"}
    assert got == runs_mod.load_benchmark_pairs(3)[0]  # the same pairs for every run


def test_repeats_are_taken_at_their_median(bench):
    assert bench.parse_args(["--repeats", "3", "--retries", "0"]).repeats == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
    runs = [{**_run("lora", "simpo", p, t), "repeat": k} for k, (p, t) in enumerate([(900, 1.0), (1000, 3.0),
                                                                                      (950, 1.2)], 1)]
    runs += [{**_run("lora", "fpo", p, t), "repeat": k} for k, (p, t) in enumerate([(990, 1.1), (1100, 1.3)], 1)]
    runs.append({"finetune": "lora", "method": "fpo", "repeat": 3, "row": None, "error": "exit 1"})
    s = bench.summarize(runs, use_gpu=False)
    assert s["medians"]["lora_simpo"] == {"peak_mb": 950, "seconds_per_step": 1.2, "cpu_seconds_per_step": 1.2,
                                           "runs": 3, "runs_measured": 3}
    assert s["medians"]["lora_fpo"]["peak_mb"] == 1045 and s["medians"]["lora_fpo"]["runs_measured"] == 2
    assert s["lora_fpo_vs_simpo_peak_memory"] == 1.1 and s["lora_fpo_vs_simpo_step_time"] == 1.0
    assert s["checks"] == {"lora_simpo": True, "lora_fpo": None}  # one FPO run has no row
    assert "#2" in bench.run_line(runs[1], False)


def test_runs_fix_glibcs_mmap_threshold_unless_told_not_to(bench, runs_mod, monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert bench.parse_args([]).malloc_mmap_threshold == 65536
    assert bench.parse_args(["--malloc-mmap-threshold", "0"]).malloc_mmap_threshold == 0
    assert runs_mod.run_env(65536)["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert "MALLOC_MMAP_THRESHOLD_" not in runs_mod.run_env(0)
