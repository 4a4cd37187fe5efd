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
    assert len(ids) <= budget
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
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
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


def test_a_template_without_a_system_role_gets_the_instruction_in_the_user_turn(tiny_model_dir):
    """Gemma-2's template raises on a system message; the contrastive instruction then opens the user turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}")
    msgs = with_instruction("How do I pick a lock?", INSTRUCTIONS["harmless"][0], 400)
    text = tok.decode(render(tok, msgs))
    assert text.startswith("<u>" + INSTRUCTIONS["harmless"][0] + "\n\nHow do I pick a lock?</u>")


def test_cut_conversations_still_open_with_a_user_turn(tok):
    dialogue = ("\n\nHuman: " + "first question about bread " * 30 + "\n\nAssistant: " + "a long reply " * 30 +
                "\n\nHuman: And how long do I bake it?\n\nAssistant:")
    msgs = with_instruction(dialogue, INSTRUCTIONS["harmless"][0], max_chars=10_000)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    header = tok(f"<|im_start|>system\n{INSTRUCTIONS['harmless'][0]}<|im_end|>\n", add_special_tokens=False)["input_ids"]
    text = tok.decode(render_clipped(tok, msgs, len(header) + 40))
    assert "<|im_start|>assistant\na long reply" not in text and "And how long do I bake it?" in text
    cut = with_instruction(dialogue, None, max_chars=300)  # the character cut lands inside the reply
    assert cut[0]["role"] == "user"


def test_both_sides_of_a_contrastive_pair_see_the_same_prompt_window(tok):
    from sparserm.align.engines.base import render_prompts

    prompt = "Human: " + "tell me about bread and the city of Paris " * 40 + "\n\nAssistant:"
    sides = [with_instruction(prompt, instruction, 10_000) for instruction in INSTRUCTIONS["harmless"]]
    short, long = sorted(sides, key=lambda c: len(c[0]["content"]))
    budget = len(render(tok, [long[0], {"role": "user", "content": "x"}])) + 30
    ids = render_prompts(tok, [short, long, [{"role": "user", "content": "Hi?"}]], budget)
    texts = [tok.decode(i) for i in ids]
    assert all(len(i) <= budget for i in ids)
    bodies = [t.split("<|im_end|>\n", 1)[1] for t in texts[:2]]  # everything after the system turn
    assert bodies[0] == bodies[1] and short[0]["content"] in texts[0] and long[0]["content"] in texts[1]
    assert ids[2] == render(tok, [{"role": "user", "content": "Hi?"}])


@pytest.mark.timeout(60)
def test_a_cut_inside_a_multibyte_character_still_shortens_the_prompt(tok):
    """Byte-level tokens: a cut can land inside "é", which decodes to U+FFFD and re-encodes to as many tokens
    as before; the cut moves on instead of looping, and no replacement character is left at the start."""
    for n in (70, 71, 300):
        msgs = [{"role": "user", "content": "é" * n}]
        ids = render_clipped(tok, msgs, 64)
        assert len(ids) <= 64
        text = tok.decode(ids)
        assert "\ufffd" not in text and "éé" in text
