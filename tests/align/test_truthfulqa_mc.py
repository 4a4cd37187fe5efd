"""TruthfulQA MC1/MC2 (sparserm.align.truthfulqa_mc) against lm-eval-harness itself, and `sparserm align evaluate`.

The lm-eval side runs its own ``truthfulqa_mc1`` / ``truthfulqa_mc2`` task yamls (prompt, target delimiter,
``process_results_mc2``) through ``simple_evaluate`` with ``HFLM`` on the same model object; only the dataset is
swapped for a local JSON file in the HF ``multiple_choice`` layout, built from questions of the shared CSV.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sparserm.align.evaluate import mc_items
from sparserm.align.truthfulqa_mc import (QA_PRIMER, encode_pair, mc_context, mc_logprobs, mc_targets,
                                          scores_from_logprobs, tok_encode, truthfulqa_mc_scores)
from sparserm.cli import main
from sparserm.config import ModelConfig, load_config
from sparserm.data.truthfulqa import MCQuestion, load_truthfulqa_mc
from sparserm.model.backbone import load_causal_lm

N_QUESTIONS = 5
TOL = 1e-4


@pytest.fixture(scope="module")
def questions(shared_data) -> list[MCQuestion]:
    return load_truthfulqa_mc(str(shared_data / "truthfulqa.csv"))[:N_QUESTIONS]


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir, cache_dir):
    return load_causal_lm(ModelConfig(name=str(tiny_model_dir), device="cpu"), cache_dir)


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_model_dir):
    """The tiny tokenizer made to prepend BOS, as Llama tokenizers do."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok.encode("Q: x")[0] == tok.bos_token_id
    return tok


@pytest.fixture
def offline(monkeypatch):
    """No hub access for lm-eval, datasets or huggingface_hub."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def hf_doc(q: MCQuestion) -> dict:
    """The HF truthful_qa/multiple_choice layout of a CSV question, written out here independently."""
    true = q.correct if q.best_answer in q.correct else [q.best_answer, *q.correct]
    return {"question": q.question,
            "mc1_targets": {"choices": [q.best_answer, *q.incorrect], "labels": [1] + [0] * len(q.incorrect)},
            "mc2_targets": {"choices": true + q.incorrect, "labels": [1] * len(true) + [0] * len(q.incorrect)}}


def run_lm_eval(model, tokenizer, questions, folder: Path) -> dict:
    """lm-eval's own truthfulqa_mc1 / truthfulqa_mc2 on ``questions``: {"mc1", "mc2", "samples1", "samples2"}."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data, tasks = folder / "truthfulqa_mc.jsonl", folder / "tasks"
    tasks.mkdir(parents=True)
    data.write_text("".join(json.dumps(hf_doc(q)) + "\n" for q in questions))
    upstream = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"
    for k in ("mc1", "mc2"):  # upstream yaml; only the task name and the dataset are replaced
        (tasks / f"local_truthfulqa_{k}.yaml").write_text(
            f"include: {upstream / f'truthfulqa_{k}.yaml'}\ntask: local_truthfulqa_{k}\ntag: []\n"
            f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n"
            f"  data_files:\n    validation: {data}\n  cache_dir: {folder / 'hf-datasets'}\n")
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    res = simple_evaluate(model=lm, tasks=["local_truthfulqa_mc1", "local_truthfulqa_mc2"], task_manager=manager,
                          log_samples=True, bootstrap_iters=0)
    samples = {k: sorted(res["samples"][f"local_truthfulqa_{k}"], key=lambda s: s["doc_id"]) for k in ("mc1", "mc2")}
    return {"mc1": float(res["results"]["local_truthfulqa_mc1"]["acc,none"]),
            "mc2": float(res["results"]["local_truthfulqa_mc2"]["acc,none"]),
            "samples1": samples["mc1"], "samples2": samples["mc2"], "lm": lm}


def assert_matches_lm_eval(model, tokenizer, questions, folder: Path) -> dict:
    ref = run_lm_eval(model, tokenizer, questions, folder)
    lps = mc_logprobs(model, tokenizer, questions)
    ours = scores_from_logprobs(mc_items(questions), lps)  # what truthfulqa_mc_scores returns
    assert ours["n_questions"] == len(questions)
    assert ours["mc1"] == pytest.approx(ref["mc1"], abs=TOL)
    assert ours["mc2"] == pytest.approx(ref["mc2"], abs=TOL)
    # per answer: the same prompt, continuation and log-likelihood as lm-eval's requests
    for q, (lp_true, lp_false), s in zip(questions, lps, ref["samples2"]):
        contexts = {a[0] for a in s["arguments"]}
        assert contexts == {mc_context(q.question)} and mc_context(q.question).startswith(QA_PRIMER + "\n\nQ: ")
        assert [a[1] for a in s["arguments"]] == [" " + c for c in mc_targets(q)["mc2_targets"]["choices"]]
        np.testing.assert_allclose(lp_true + lp_false, [r[0][0] for r in s["resps"]], atol=TOL, rtol=0)
    return {"ours": ours, "ref": ref}


def test_targets_from_csv_follow_the_hf_layout(questions):
    for q in questions:
        assert mc_targets(q) == hf_doc(q)
    q = MCQuestion("Q?", best_answer="c", correct=["a", "b"], incorrect=["x", "y"])
    assert mc_targets(q) == {"question": "Q?", "mc1_targets": {"choices": ["c", "x", "y"], "labels": [1, 0, 0]},
                             "mc2_targets": {"choices": ["c", "a", "b", "x", "y"], "labels": [1, 1, 1, 0, 0]}}


def test_scores_on_hand_computed_loglikelihoods():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2

    qs = [MCQuestion("Q1", best_answer="a", correct=["a", "b"], incorrect=["x", "y"]),
          MCQuestion("Q2", best_answer="b", correct=["a", "b"], incorrect=["x"]),
          MCQuestion("Q3", best_answer="a", correct=["a"], incorrect=["x", "y"])]
    lps = [([math.log(0.3), math.log(0.1)], [math.log(0.4), math.log(0.2)]),  # best 0.3 loses to 0.4
           ([math.log(0.1), math.log(0.4)], [math.log(0.4)]),  # best (index 1) ties the false answer
           ([-1.0], [-2.0, -3.0])]
    scores = scores_from_logprobs(mc_items(qs), lps)
    mc2 = [0.4, 0.5 / 0.9, math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3))]
    assert scores["n_questions"] == 3
    assert scores["mc1"] == pytest.approx(2 / 3)  # Q2 by the tie (lm-eval's argmax takes the first), Q3
    assert scores["mc2"] == pytest.approx(sum(mc2) / 3)
    for q, (t, f), want in zip(qs, lps, mc2):  # lm-eval's own MC2 on the same numbers
        labels = mc_targets(q)["mc2_targets"]["labels"]
        assert len(labels) == len(t + f)
        got = process_results_mc2({"mc2_targets": {"labels": labels}}, [(v, False) for v in t + f])["acc"]
        assert got == pytest.approx(want)
        lls = [t[mc_items([q])[0][3]], *f]  # MC1: lm-eval's argmax over best + false answers, gold index 0
        assert (np.argmax(lls) == 0) == (scores_from_logprobs(mc_items([q]), [(t, f)])["mc1"] == 1.0)
    with pytest.raises(ValueError):
        scores_from_logprobs(mc_items(qs), lps[:2])


def test_encoding_equals_hflm(tiny_lm, bos_tokenizer):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_lm
    cases = [(mc_context("How do I bake bread?"), " Mix flour, water and yeast"), ("A: ", "Paris."),
             ("Q: x\nA:\n ", "y"), (tok.bos_token + "Q: x", " y")]
    for t in (tok, bos_tokenizer):
        lm = HFLM(pretrained=model, tokenizer=t, batch_size=1)
        for context, continuation in cases:
            assert encode_pair(t, context, continuation) == lm._encode_pair(context, continuation)
            assert tok_encode(t, context) == lm.tok_encode(context)
    ctx, cont = encode_pair(bos_tokenizer, "Q: x", " y")
    assert ctx[0] == bos_tokenizer.bos_token_id and ctx.count(bos_tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("tokenizer", ["plain", "bos"])
def test_tiny_model_equals_lm_eval(tiny_lm, bos_tokenizer, questions, tokenizer, tmp_path, offline):
    model, tok = tiny_lm
    tok = bos_tokenizer if tokenizer == "bos" else tok
    out = assert_matches_lm_eval(model, tok, questions, tmp_path)
    assert truthfulqa_mc_scores(model, tok, questions) == out["ours"]
    # the tiny model's 512-token context forces lm-eval's left truncation on some answers: covered above
    assert any(len(c) + len(a) > 513 for q in questions
               for c, a in [encode_pair(tok, mc_context(q.question), " " + x) for x in q.correct + q.incorrect])
    # the shared primer changes nothing but float rounding
    plain = truthfulqa_mc_scores(model, tok, questions, share_primer=False)
    assert plain["mc1"] == out["ours"]["mc1"] and plain["mc2"] == pytest.approx(out["ours"]["mc2"], abs=1e-5)


@pytest.mark.embedded
def test_embedded_model_equals_lm_eval(embedded_cache_dir, questions, tmp_path, offline):
    model, tok = load_causal_lm(ModelConfig(name="embedded", device="cpu"), embedded_cache_dir)
    out = assert_matches_lm_eval(model, tok, questions, tmp_path)
    assert 0.0 < out["ours"]["mc2"] < 1.0


# ---- sparserm align evaluate -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_csv(questions, tmp_path_factory) -> Path:
    import csv

    path = tmp_path_factory.mktemp("tqa-csv") / "tqa.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        for q in questions[:3]:
            w.writerow(["Adversarial", "Misc", q.question, q.best_answer, "; ".join(q.correct),
                        "; ".join(q.incorrect), ""])
        w.writerow(["Adversarial", "Misc", "Is the sky green?", "No", "No; It is blue", "Yes", ""])
    return path


def _cli_json(capsys, *argv) -> dict:
    assert main(["align", "evaluate", *argv, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_cli_evaluates_a_model_folder(tiny_model_dir, tiny_lm, small_csv, capsys):
    model, tok = tiny_lm
    want = truthfulqa_mc_scores(model, tok, load_truthfulqa_mc(str(small_csv)))
    got = _cli_json(capsys, str(tiny_model_dir), str(small_csv))
    assert set(got) == {"mc1", "mc2", "n_questions"} and got["n_questions"] == 4
    assert got["mc1"] == want["mc1"] and got["mc2"] == pytest.approx(want["mc2"], abs=1e-6)
    got = _cli_json(capsys, str(tiny_model_dir), str(small_csv), "--max-questions", "2")
    want = truthfulqa_mc_scores(model, tok, load_truthfulqa_mc(str(small_csv))[:2])
    assert got["n_questions"] == 2 and got["mc2"] == pytest.approx(want["mc2"], abs=1e-6)


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, cache_dir, tmp_path_factory):
    """A LoRA adapter (random, non-zero B) on the tiny model, saved where an align run keeps its adapters,
    under a manifest.json as the align job writes it. Returns (run folder, adapter folder, peft model)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from sparserm.manifest import write_manifest

    run = tmp_path_factory.mktemp("align-run")
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"run.cache_dir={cache_dir}", "model.device=cpu"])
    write_manifest(run, cfg, "align")
    base, _ = load_causal_lm(cfg.model, cache_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.5, init_lora_weights=False,
                                                 task_type="CAUSAL_LM")).eval()
    adapter = run / "rm" / "round_1" / "adapter"
    peft_model.save_pretrained(str(adapter))
    return run, adapter, peft_model


def test_cli_evaluates_an_adapter_of_an_align_run(adapter_run, tiny_model_dir, tiny_lm, small_csv, capsys, tmp_path):
    import shutil

    run, adapter, peft_model = adapter_run
    tok = tiny_lm[1]
    qs = load_truthfulqa_mc(str(small_csv))
    want = truthfulqa_mc_scores(peft_model, tok, qs)
    assert want["mc2"] != pytest.approx(truthfulqa_mc_scores(tiny_lm[0], tok, qs)["mc2"], abs=1e-6)
    peft_model.train()  # scored in eval mode (no LoRA dropout), and the mode is given back
    assert truthfulqa_mc_scores(peft_model, tok, qs) == want and peft_model.training
    peft_model.eval()
    got = _cli_json(capsys, str(adapter), str(small_csv))  # base from the run's manifest.json
    assert got["n_questions"] == 4 and got["mc1"] == want["mc1"]
    assert got["mc2"] == pytest.approx(want["mc2"], abs=1e-6)

    loose = tmp_path / "adapter"  # no manifest above it: --model, else adapter_config's base_model_name_or_path
    shutil.copytree(adapter, loose)
    assert _cli_json(capsys, str(loose), str(small_csv), "--model", str(tiny_model_dir))["mc2"] == got["mc2"]
    assert _cli_json(capsys, str(loose), str(small_csv))["mc2"] == got["mc2"]
    cfg_path = loose / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": None}))
    assert main(["align", "evaluate", str(loose), str(small_csv), "--json"]) == 1
    assert "--model" in json.loads(capsys.readouterr().out)["error"]


def test_cli_errors_and_align_syntax_kept(tiny_model_dir, small_csv, tmp_path, capsys):
    from sparserm.cli import build_parser

    assert main(["align", "evaluate", str(tiny_model_dir), str(tmp_path / "missing.csv"), "--json"]) == 1
    assert "missing.csv" in json.loads(capsys.readouterr().out)["error"]
    assert main(["align", "evaluate", str(tiny_model_dir)]) == 2
    assert main(["align", "evaluate", str(tiny_model_dir), str(small_csv), "--model", "x/y"]) == 1
    assert "not an adapter" in json.loads(capsys.readouterr().out)["error"]
    args = build_parser().parse_args(["align", "cfg.yaml", "align.rounds=1", "--output-dir", "out"])
    assert (args.config, args.overrides, args.output_dir, args.stage) == ("cfg.yaml", ["align.rounds=1"], "out", "align")
    assert main(["align", "model.layer=1", "--json"]) == 2  # evaluate's options are refused elsewhere
