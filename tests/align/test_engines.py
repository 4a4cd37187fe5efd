"""Engine details that decide what a label means: the prompt clipped without losing the instruction, one
seed per vLLM request, and no GPU for an actor that reserved none."""
import pytest

from sparserm.align.engines.base import render, render_clipped
from sparserm.align.prompts import INSTRUCTIONS, with_instruction


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _contains(ids, sub):
    return any(ids[i: i + len(sub)] == sub for i in range(len(ids) - len(sub) + 1))


def test_long_prompt_is_cut_in_the_user_turn_never_the_instruction(tok):
    instruction = INSTRUCTIONS["harmless"][1]
    prompt = ("\n\nHuman: " + "tell me about bread and the city of Paris " * 40 + "\n\nAssistant: Sure." +
              "\n\nHuman: How do I bake bread at home?\n\nAssistant:")
    msgs = with_instruction(prompt, instruction, max_chars=10_000)
    full = render(tok, msgs)
    header = tok(f"<|im_start|>system\n{instruction}<|im_end|>\n", add_special_tokens=False)["input_ids"]
    budget = len(header) + 40
    assert len(full) > 2 * budget
    ids = render_clipped(tok, msgs, budget)
    assert budget - 8 <= len(ids) <= budget  # re-tokenizing at the cut may lose a few tokens
    assert ids[: len(header)] == header[: len(header)]  # the system turn survives whole, at the start
    assert tok.decode(ids).rstrip().endswith("How do I bake bread at home?<|im_end|>\n<|im_start|>assistant")
    assert not _contains(full[-budget:], header[:8])  # the old left clip of the rendered prompt lost the instruction
    with pytest.raises(ValueError, match="no room"):
        render_clipped(tok, msgs, len(header) + 4)
    short = with_instruction("Hi?", instruction, 400)
    assert render_clipped(tok, short, 1000) == render(tok, short)


def test_every_vllm_request_gets_its_own_seed():
    from sparserm.align.engines.vllm import request_seeds

    seeds = request_seeds(seed=5, n=4)
    assert len(set(seeds)) == 4 and seeds[0] == 5


def test_an_actor_without_a_gpu_share_never_uses_a_visible_gpu(tmp_path):
    """On a logical GPU: the 1-GPU actor resolves ``auto`` to CUDA, the 0-GPU actor to the CPU (CUDA is
    faked visible inside both actors, as it is on a GPU node, where Ray leaves CUDA_VISIBLE_DEVICES alone
    for an actor that reserved nothing)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text('''
import json, ray, torch
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
@ray.remote
def probe():
    torch.cuda.is_available = lambda: True
    from sparserm.model.backbone import resolve_device
    return str(resolve_device("auto"))
print(json.dumps([ray.get(probe.options(num_gpus=g, num_cpus=0).remote()) for g in (1, 0.5, 0)]))
''')
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == ["cuda", "cuda", "cpu"]
