"""One GPU runs the whole loop: on a logical GPU (``ray.init(num_gpus=1)``; this machine has no CUDA) the
actors are built exactly as the GPU path builds them, with the one-GPU configs' fractions (vLLM 0.4,
evaluator 0.2, scorer 0.2, one DPO worker 0.2) and only the vLLM engine class swapped for the transformers
engine (vLLM needs CUDA). A round of generation -> scoring -> DPO -> evaluation must finish with every
placement group created and every actor and worker on GPU 0; asking for more than the GPU is refused at once."""
import json
from pathlib import Path
import subprocess
import sys
import textwrap

import pytest

JOB = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import ray
    from ray.util import placement_group_table
    from sparserm.align.engines import vllm as vllm_module
    from sparserm.align.engines.hf import HFPolicy

    class TransformersInVLLMPlace(HFPolicy):
        """The transformers engine with the vLLM engine's constructor, sleep and wake-up."""
        def __init__(self, model_cfg, cache_dir, **vllm_kwargs):
            super().__init__(model_cfg, cache_dir, 1)
            self.slept = 0
        def sleep(self):
            self.slept += 1
        def wake_up(self):
            pass
        def times_slept(self):
            return self.slept

    vllm_module.VLLMEngine = TransformersInVLLMPlace
    from sparserm.align.cli import run_align
    from sparserm.config import load_config

    model, rm, data, out, *extra = sys.argv[1:]
    ray.init(address="local", num_cpus=6, num_gpus=1, include_dashboard=False, log_to_driver=False)
    cfg = load_config("jobs/configs/gemma-2-2b-it.yaml", [
        f"model.name={model}", "model.dtype=float32", f"align.rm_dir={rm}", "align.rounds=1", "align.filters=[none]",
        "align.prompts_per_round=3", "align.generate.max_new_tokens=6", "align.generate.max_prompt_tokens=96",
        "align.generate.batch_size=8", "align.train.epochs=1", "align.train.batch_size=4",
        "align.train.micro_batch_size=2", "align.train.num_cpus=1", "align.train.backend=gloo",
        "align.eval.mc_questions=2", "align.eval.hh_pairs=2", "align.eval.winrate_prompts=2",
        "align.policy.num_cpus=0.5", "align.scorer.num_cpus=0.5", "align.generate.vllm.num_cpus=0.5",
        f"data.sources=[{{path: {data}/hh_rlhf_harmless.jsonl.gz}}, {{path: {data}/truthfulqa.csv}}]", *extra])
    t0 = time.time()
    try:
        result = run_align(cfg, Path(out))
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc), "seconds": time.time() - t0}))
        sys.exit(0)
    history = json.loads(open(f"{out}/none/round_1/train.json").read())["history"]
    print(json.dumps({"seconds": time.time() - t0, "stopped": result["stopped"],
                      "pg_states": [p["state"] for p in placement_group_table().values()],
                      "dpo_placement": history[0]["placement"], "rows": result["rows"]["none"],
                      "actors": json.loads(open(f"{out}/placement.json").read())}))
''')


def _run(tmp_path, tiny_model_dir, shared_data, *extra) -> dict:
    from sparserm.testing import build_tiny_rm

    rm = build_tiny_rm(tmp_path / "rm", model_dir=tiny_model_dir)
    script = tmp_path / "job.py"
    script.write_text(JOB)
    res = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(rm), str(shared_data),
                          str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_one_gpu_runs_generation_scoring_dpo_and_evaluation(tmp_path, tiny_model_dir, shared_data):
    out = _run(tmp_path, tiny_model_dir, shared_data)
    assert "error" not in out, out
    assert not out["stopped"] and [r["round"] for r in out["rows"]] == [0, 1]
    assert out["pg_states"] and set(out["pg_states"]) <= {"CREATED", "REMOVED"}  # vLLM's bundle was placed
    assert out["dpo_placement"]["gpu_ids"] == ["0"]  # the DPO worker shared GPU 0 with the engines
    assert sorted(out["actors"]) == ["engine_0", "policy", "scorer"]  # the engine in vLLM's placement group
    assert all(a["gpu_ids"] == ["0"] for a in out["actors"].values())


def test_asking_for_more_than_the_gpu_fails_at_once_naming_the_keys(tmp_path, tiny_model_dir, shared_data):
    out = _run(tmp_path, tiny_model_dir, shared_data, "align.train.num_gpus=0.5")
    assert out["error"] == "ConfigError" and out["seconds"] < 60
    assert "align.train.num_gpus 0.5 x 1" in out["message"] and "the cluster has 1" in out["message"]
