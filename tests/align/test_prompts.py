"""Alignment prompts: tasks from the sources, train/eval split, fresh prompts per round, instructions."""
from sparserm.align.prompts import INSTRUCTIONS, TaskData, load_tasks, round_prompts, with_instruction
from sparserm.config import load_config


def test_tasks_from_shared_sources(shared_data):
    cfg = load_config(None, [f"data.sources=[{{path: {shared_data}/hh_rlhf_harmless.jsonl.gz}}, "
                             f"{{path: {shared_data}/truthfulqa.csv}}]"])
    hh, tqa = load_tasks(cfg)
    assert (hh.task, tqa.task) == ("harmless", "truthfulqa")
    for t in (hh, tqa):
        assert len(set(t.train_prompts)) == len(t.train_prompts) > 100
        assert not set(t.train_prompts) & {p["prompt"] for p in t.eval_pairs}  # the RM's prompt split
    assert tqa.mc and not hh.mc and {q.question for q in tqa.mc} <= {p["prompt"] for p in tqa.eval_pairs}
    assert load_tasks(cfg)[0].train_prompts == hh.train_prompts  # the shuffle depends only on the seed


def test_rounds_take_fresh_prompts_then_wrap():
    task = TaskData("harmless", "x.jsonl", [f"p{i}" for i in range(5)], [], [])
    r1, r2 = round_prompts(task, 1, 2), round_prompts(task, 2, 2)
    assert r1 == ["p0", "p1"] and r2 == ["p2", "p3"]
    r3 = round_prompts(task, 3, 2)  # p4, then the second pass over the pool in a new order
    assert r3[0] == "p4" and r3[1] in task.train_prompts
    assert round_prompts(task, 3, 2) == r3


def test_instruction_survives_truncation():
    long_prompt = "Human: " + "blah " * 500 + "\n\nAssistant:"
    msgs = with_instruction(long_prompt, INSTRUCTIONS["harmless"][0], max_chars=200)
    assert msgs[0] == {"role": "system", "content": INSTRUCTIONS["harmless"][0]}
    assert sum(len(m["content"]) for m in msgs[1:]) <= 200
    assert with_instruction("What is 2+2?", None, 100) == [{"role": "user", "content": "What is 2+2?"}]
