"""``sparserm align CONFIG [overrides]``: the iterative alignment job (resumes in the same --output-dir).

``sparserm align evaluate POLICY DATA [--json] [--max-questions N] [--model NAME]``: TruthfulQA MC1/MC2 of a
policy on a TruthfulQA-format CSV (every question of it), as lm-eval computes them
(:mod:`sparserm.align.truthfulqa_mc`). POLICY is anything ``model.name`` takes, or a peft LoRA adapter folder
(it holds ``adapter_config.json``); the adapter's base is ``--model`` when given, else the ``model`` of the
run's ``manifest.json`` in a folder above the adapter (an align run keeps its adapters in
``<run>/<filter>/round_<r>/adapter/``), else the adapter's own ``base_model_name_or_path``.
``evaluate`` is read as the first positional word of ``align`` (so ``align CONFIG`` keeps its syntax); its
options come after POLICY and DATA.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MANIFEST_LEVELS = 6  # folders above an adapter searched for the run's manifest.json


def run_align(cfg, out: Path, stop_after: tuple[int, str] | None = None) -> dict:
    from sparserm.align.report import write_report
    from sparserm.align.rounds import AlignJob, log, own_reward_model
    from sparserm.manifest import write_manifest
    from sparserm.ray_train import ensure_ray

    t0 = time.time()
    ensure_ray(cfg.run.ray_address)
    rm_dir = cfg.align.rm_dir or own_reward_model(cfg, Path(out) / "reward_model")
    out.mkdir(parents=True, exist_ok=True)
    job = AlignJob(cfg, out, rm_dir, stop_after=stop_after)
    job.check_finished()  # a setting that finished rounds were not made with: refused before anything is written
    write_manifest(out, cfg, "align", extra={"rm_dir": rm_dir})
    result = job.run()
    if not result["stopped"]:
        timings = {**result.get("timings", {}), "this_invocation": round(time.time() - t0, 1)}
        report = write_report(out, result["rows"], timings, result["per_item"])
        log(f"finished in {timings['this_invocation']} s; report: {report}")
    return result


def _align(args, load) -> int:
    if args.config == "evaluate" and not Path("evaluate").is_file():
        return _evaluate(args)
    given = [f for f, v in (("--json", args.json), ("--max-questions", args.max_questions),
                            ("--model", args.model)) if v not in (None, False)]
    if given:
        print(f"{', '.join(given)}: only with 'sparserm align evaluate'", file=sys.stderr)
        return 2
    cfg, out = load(args)
    run_align(cfg, out)
    print(out)
    return 0


def add_align_command(sub, config_args, load) -> None:
    p = sub.add_parser("align", help="iterative alignment: generate, filter by SparseRM, DPO with LoRA, per round; "
                                     "'align evaluate POLICY DATA': TruthfulQA MC1/MC2 (lm-eval's)",
                       usage="%(prog)s [config] [overrides ...] [--output-dir DIR]\n"
                             "       %(prog)s evaluate POLICY DATA [--json] [--max-questions N] [--model NAME]",
                       epilog=EVALUATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_args(p)
    # options of `align evaluate`; they live on the align parser because `evaluate` is read as its first word
    p.add_argument("--json", action="store_true", help="(evaluate) print only the JSON result, on one line")
    p.add_argument("--max-questions", type=int, default=None, help="(evaluate) score the first N questions")
    p.add_argument("--model", default=None, help="(evaluate) base model of an adapter POLICY (as model.name)")
    p.set_defaults(func=lambda a: _align(a, load), stage="align")


EVALUATE_EPILOG = """align evaluate POLICY DATA: TruthfulQA MC1/MC2 as lm-eval's truthfulqa_mc1/mc2 compute them
  POLICY  'embedded', a hub id, a local HF folder or .gguf (as model.name), or a peft LoRA adapter folder
  DATA    a TruthfulQA-format CSV (all of its questions are scored)
  prints {"mc1", "mc2", "n_questions"}"""


def find_manifest_model(adapter: Path) -> tuple[dict, str | None] | None:
    """(``config.model``, ``config.run.cache_dir``) of the nearest ``manifest.json`` above ``adapter``."""
    for folder in list(adapter.resolve().parents)[:MANIFEST_LEVELS]:
        path = folder / "manifest.json"
        if path.is_file():
            config = json.loads(path.read_text()).get("config") or {}
            if isinstance(config.get("model"), dict):
                return config["model"], (config.get("run") or {}).get("cache_dir")
    return None


def resolve_policy(policy: str, model: str | None = None):
    """(base ModelConfig, adapter folder or None, cache folder) of a POLICY argument."""
    from sparserm.config import ModelConfig, build, default_cache_dir

    path = Path(policy).expanduser()
    if not (path / "adapter_config.json").is_file():
        if model is not None:
            raise ValueError(f"--model names the base of an adapter, but {policy} is not an adapter folder")
        return ModelConfig(name=policy), None, default_cache_dir()
    if model is not None:
        return ModelConfig(name=model), str(path), default_cache_dir()
    found = find_manifest_model(path)
    if found is not None:
        model_dict, cache_dir = found
        return build(ModelConfig, model_dict, "model"), str(path), cache_dir or default_cache_dir()
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{policy}: no manifest.json above the adapter and no base_model_name_or_path in its "
                         f"adapter_config.json; name the base with --model")
    return ModelConfig(name=base), str(path), default_cache_dir()


def load_policy(policy: str, model: str | None = None):
    """(causal LM in eval mode, tokenizer) of a POLICY argument; an adapter is attached with peft."""
    from sparserm.model.backbone import load_causal_lm, quiet_peft

    cfg, adapter, cache_dir = resolve_policy(policy, model)
    lm, tok = load_causal_lm(cfg, cache_dir)
    if adapter is not None:
        from peft import PeftModel

        with quiet_peft():
            lm = PeftModel.from_pretrained(lm, adapter).eval()
    return lm, tok


def evaluate_policy(policy: str, data: str, *, max_questions: int | None = None, model: str | None = None) -> dict:
    """``{"mc1", "mc2", "n_questions"}`` of POLICY on the TruthfulQA CSV ``data``."""
    from sparserm.align.truthfulqa_mc import truthfulqa_mc_scores
    from sparserm.data.truthfulqa import load_truthfulqa_mc

    questions = load_truthfulqa_mc(data)
    if max_questions is not None:
        if max_questions < 1:
            raise ValueError(f"--max-questions must be at least 1, got {max_questions}")
        questions = questions[:max_questions]
    if not questions:
        raise ValueError(f"{data}: no question with a correct and an incorrect answer")
    lm, tok = load_policy(policy, model)
    return truthfulqa_mc_scores(lm, tok, questions)


def _evaluate(args) -> int:
    if args.output_dir is not None or len(args.overrides) != 2:
        print("usage: sparserm align evaluate POLICY DATA [--json] [--max-questions N] [--model NAME]",
              file=sys.stderr)
        return 2
    policy, data = args.overrides
    try:
        result = evaluate_policy(policy, data, max_questions=args.max_questions, model=args.model)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
