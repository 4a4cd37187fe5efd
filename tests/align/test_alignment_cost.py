"""benchmarks/alignment_cost.py: the FLOPs it counts per stage equal a hand count of the config's sizes, its
GPU-hours are those FLOPs at the throughput it is given, and its model shapes are the models' own."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("alignment_cost_bench", ROOT / "benchmarks" / "alignment_cost.py")
cost = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cost
spec.loader.exec_module(cost)


def test_train_and_decode_flops_are_the_hand_count(capsys):
    out = cost.main([str(ROOT / "jobs/configs/gemma-2-2b-it.yaml"), "--peak-tflops", "100", "--mfu-train", "0.5"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    n_f = 2_614_341_888  # tied head: every parameter multiplies (blocks + head)
    # 2 tasks x 5 rounds x 400 pairs x 2 sequences x (1 reference pass + 3 LoRA epochs of 4 N T) x 512 tokens
    train = 2 * 5 * 400 * 2 * (2 + 4 * 3) * n_f * 512
    assert out["pflops"]["train"] == pytest.approx(train / 1e15, abs=0.01)
    decode = 2 * 5 * 400 * 2 * 2 * n_f * 256  # both labellers sample 2 responses of 256 tokens per prompt
    assert out["pflops"]["generate_decode"] == pytest.approx(decode / 1e15, abs=0.01)
    assert out["gpu_hours"]["train"] == pytest.approx(train / (100e12 * 0.5) / 3600, rel=1e-2)
    full = cost.main([str(ROOT / "jobs/configs/gemma-2-2b-it.yaml"), "align.train.finetune=full"])
    assert full["pflops"]["train"] == pytest.approx(2 * 5 * 400 * 2 * (2 + 6 * 3) * n_f * 512 / 1e15, abs=0.01)


def test_untied_head_and_truncated_forward():
    llama = cost.MODELS["meta-llama/Llama-3.1-8B-Instruct"]
    assert llama.forward == pytest.approx(llama.params - llama.embedding)  # the input embedding is a lookup
    assert llama.truncated(15) == pytest.approx(llama.blocks / 2)  # 16 of 32 blocks, no head


@pytest.mark.parametrize("name", ["gemma-2-9b-it", "llama-3.1-8b-instruct", "gemma-3-270m-it"])
def test_every_paper_config_has_a_shape(name, capsys):
    out = cost.main([str(ROOT / "jobs/configs" / f"{name}.yaml")])
    assert out["prompts_per_task"] == 2000 and out["gpu_hours_total"] > 0
    assert out["memory_gb"]["dpo_lora_micro_batch"] > out["memory_gb"]["weights_bf16"]


@pytest.mark.embedded
def test_the_embedded_shape_is_the_embedded_models(embedded_cache_dir):
    from safetensors import safe_open

    from sparserm.model.embedded import embedded_model_dir

    folder = embedded_model_dir(embedded_cache_dir)
    config = json.loads((folder / "config.json").read_text())
    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    shape = cost.MODELS["embedded"]
    assert (shape.n_layers, shape.d_model, shape.vocab) == (config["num_hidden_layers"], config["hidden_size"],
                                                            config["vocab_size"])
    assert n == shape.params and shape.tied == config.get("tie_word_embeddings", True)
    assert cost.shape_of(str(folder)) == shape  # a local model folder's shape, counted from its own files


def test_a_model_with_no_shape_and_a_folder_that_is_no_run_are_refused_naming_them(tmp_path):
    with pytest.raises(SystemExit, match="no shape in MODELS"):
        cost.shape_of("org/unknown-model")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit, match=f"--measured {tmp_path}: not a finished `sparserm align` run"):
        cost.measured_rates(tmp_path)


def test_measured_hours_are_each_stages_flops_at_its_phases_rate():
    rates = {"tflop_per_s": {"generate+label+score": 2.0, "dpo": 4.0, "evaluate": 1.0}}
    flops = {"generate_prefill": 7.2e15, "generate_decode": 3.6e15, "score": 0.0, "train": 14.4e15,
             "evaluate": 3.6e15}
    assert cost.measured_hours(flops, rates) == pytest.approx(
        {"generate_prefill": 1.0, "generate_decode": 0.5, "score": 0.0, "train": 1.0, "evaluate": 1.0})
