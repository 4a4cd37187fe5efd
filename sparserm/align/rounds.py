"""``sparserm align``: R rounds of generate -> filter by SparseRM -> DPO with LoRA, for each filter side by side.

Layout of the output folder (every step writes its files atomically and is skipped when they exist, so a
killed job rerun on the same folder resumes at the first unfinished step and repeats nothing finished):

    round_0/eval.json, round_0/generations.jsonl     the base policy (shared by every filter)
    round_1/candidates.jsonl, generation.json        round-1 pairs from the base policy (shared)
    <filter>/round_<r>/candidates.jsonl              r >= 2: pairs from that run's policy
    <filter>/round_<r>/pairs.jsonl, filter.json      kept pairs, counts and margins
    <filter>/round_<r>/train/                        Ray Train run (epoch checkpoints; resumes)
    <filter>/round_<r>/adapter/                      the round's LoRA adapter (safetensors)
    <filter>/round_<r>/metrics.json                  everything of the round; its presence marks it done
    state.json, report.md, report.json, metrics.png, manifest.json
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import ray

from sparserm.align.evaluate import harmless_likelihood, truthfulqa_mc, win_rate
from sparserm.align.filter import filter_pairs
from sparserm.align.pairs import make_pairs, sampling_of
from sparserm.align.prompts import TaskData, load_tasks, round_prompts, with_instruction
from sparserm.config import Config
from sparserm.manifest import read_jsonl, write_json, write_jsonl


def log(msg: str) -> None:
    print(f"[align {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class AlignJob:
    def __init__(self, cfg: Config, out: Path, rm_dir: str, stop_after: tuple[int, str] | None = None):
        # absolute: Ray Train workers run in their own working directory
        self.cfg, self.a, self.out, self.rm_dir = cfg, cfg.align, Path(out).resolve(), str(Path(rm_dir).resolve())
        self.stop_after = stop_after  # (round, filter): return after that round's DPO, as a killed job would
        self.tasks: list[TaskData] = load_tasks(cfg)
        self.max_tokens = self.a.max_prompt_tokens + self.a.max_new_tokens
        self.pool = self.policy = self.scorer = None
        timings = self.out / "timings.json"  # seconds per phase, summed over every invocation on this folder
        self.timings: dict[str, float] = json.loads(timings.read_text()) if timings.is_file() else {}

    # ------------------------------------------------------------ helpers
    def _actors(self):
        if self.pool is None:
            from sparserm.align.engines.factory import make_actors

            self.pool, self.policy, self.scorer = make_actors(self.cfg, self.rm_dir)
        return self.pool

    def _timed(self, key: str, t0: float) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + time.time() - t0, 1)
        write_json(self.out / "timings.json", self.timings)

    def _set_adapter(self, adapter: str | None) -> None:
        self._actors().set_adapter(adapter)
        if self.pool.kind != "hf":
            ray.get(self.policy.set_adapter.remote(adapter))

    def eval_prompts(self) -> list[tuple[str, str]]:
        n = self.a.eval_winrate_prompts
        per = [[(t.task, p["prompt"]) for p in t.eval_pairs] for t in self.tasks]
        out = []
        for i in range(max((len(x) for x in per), default=0)):  # interleave tasks
            out += [x[i] for x in per if i < len(x)]
        return out[:n]

    # ------------------------------------------------------------ steps
    def evaluate(self, adapter: str | None, gens_path: Path) -> dict:
        """Metrics of the policy with ``adapter``; writes its eval generations to ``gens_path``."""
        t0 = time.time()
        self._set_adapter(adapter)
        a, out = self.a, {}
        mc = [q for t in self.tasks for q in t.mc][: a.eval_mc_questions]
        if mc:
            out.update(truthfulqa_mc(self.policy, mc, self.max_tokens))
        hh = [p for t in self.tasks if t.task == "harmless" for p in t.eval_pairs][: a.eval_hh_pairs]
        out.update(harmless_likelihood(self.policy, hh, self.max_tokens))
        items = self.eval_prompts()
        if items:
            convs = [with_instruction(p, None, 4 * a.max_prompt_tokens) for _, p in items]
            gens = self.pool.generate(convs, sampling_of(a), self.cfg.run.seed + 999, a.generation_batch_size)
            texts = [g["text"] or "(empty)" for g in gens]
            scores = ray.get(self.scorer.score.remote([p for _, p in items], texts))
            write_jsonl(gens_path, [{"task": t, "prompt": p, "response": r, "score": s}
                                    for (t, p), r, s in zip(items, texts, scores)])
            base = self.out / "round_0" / "generations.jsonl"
            base_scores = [g["score"] for g in read_jsonl(base)] if base.is_file() else scores
            out["rm_win_rate"] = win_rate(scores, base_scores)
            out["rm_score_mean"] = sum(scores) / len(scores)
        self._timed("evaluate", t0)
        return out

    def candidates(self, r: int, adapter: str | None, folder: Path) -> list[dict]:
        path = folder / "candidates.jsonl"
        if path.is_file():
            return read_jsonl(path)
        t0 = time.time()
        self._set_adapter(adapter)
        items = [(t.task, p) for t in self.tasks for p in round_prompts(t, r, self.a.prompts_per_round)]
        pairs, stats = make_pairs(self.pool, self.scorer, items, self.a, self.cfg.run.seed * 1000 + r)
        t1 = time.time()
        unscored = [p for p in pairs if "score_chosen" not in p]  # ranked pairs come with their scores
        if unscored:
            s_w, s_l = ray.get(self.scorer.score_pairs.remote([p["prompt"] for p in unscored],
                                                              [p["chosen"] for p in unscored],
                                                              [p["rejected"] for p in unscored]))
            for p, sw, sl in zip(unscored, s_w, s_l):
                p.update(score_chosen=sw, score_rejected=sl)
        stats.update(generate_s=round(t1 - t0, 1), score_s=round(time.time() - t1, 1))
        write_json(folder / "generation.json", stats)
        write_jsonl(path, pairs)
        self._timed("generate+score", t0)
        log(f"round {r}: {len(pairs)} pairs from {len(items)} prompts ({stats['generate_s']} s generation, "
            f"{stats['score_s']} s RM scoring)")
        return pairs

    def run_round(self, r: int, filt: str, prev_adapter: str | None) -> dict:
        from sparserm.align.trainer import train_dpo

        folder = self.out / filt / f"round_{r}"
        folder.mkdir(parents=True, exist_ok=True)
        shared = self.out / "round_1" if r == 1 else folder  # round-1 pairs come from the base policy
        cands = self.candidates(r, prev_adapter, shared)
        kept, fstats = filter_pairs([dict(p) for p in cands], [p["score_chosen"] for p in cands],
                                    [p["score_rejected"] for p in cands], filt)
        write_jsonl(folder / "pairs.jsonl", kept)
        write_json(folder / "filter.json", fstats)
        log(f"round {r} [{filt}]: kept {fstats['n_kept']}/{fstats['n_pairs']} pairs "
            f"(RM agrees on {fstats['rm_agreement']:.2f}, mean margin {fstats['margin_mean']:.3f})")
        adapter_dir = folder / "adapter"
        train = {"history": json.loads((folder / "train.json").read_text())} if (folder / "train.json").is_file() else None
        if train is None:
            t0 = time.time()
            stop = self.a.epochs if self.stop_after != (r, filt) else 1
            res = train_dpo(self.cfg, kept, storage_dir=folder, name="train", init_adapter=prev_adapter,
                            stop_after_epoch=stop)
            if not res["finished"]:
                return {"stopped": True}
            if adapter_dir.exists():
                shutil.rmtree(adapter_dir)
            shutil.copytree(res["adapter"], adapter_dir)
            write_json(folder / "train.json", res["history"])
            self._timed("dpo", t0)
            train = {"history": res["history"], "dpo_s": round(time.time() - t0, 1)}
        metrics = self.evaluate(str(adapter_dir), folder / "eval_generations.jsonl")
        row = {"round": r, "filter": filt, **{k: fstats[k] for k in ("n_pairs", "n_kept", "rm_agreement")},
               "dpo_loss": train["history"][-1]["loss"], "dpo_reward_accuracy": train["history"][-1]["reward_accuracy"],
               **metrics}
        write_json(folder / "metrics.json", row)
        log(f"round {r} [{filt}] done: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                          for k, v in row.items()}))
        return row

    # ------------------------------------------------------------ the job
    def run(self) -> dict:
        base_eval = self.out / "round_0" / "eval.json"
        if base_eval.is_file():
            round0 = json.loads(base_eval.read_text())
        else:
            round0 = {"round": 0, **self.evaluate(None, self.out / "round_0" / "generations.jsonl")}
            write_json(base_eval, round0)
            log("round 0 (base policy): " + json.dumps(round0))
        rows = {f: [dict(round0, filter=f)] for f in self.a.filters}
        for r in range(1, self.a.rounds + 1):
            for filt in self.a.filters:
                done = self.out / filt / f"round_{r}" / "metrics.json"
                if done.is_file():
                    rows[filt].append(json.loads(done.read_text()))
                    continue
                prev = str(self.out / filt / f"round_{r - 1}" / "adapter") if r > 1 else None
                row = self.run_round(r, filt, prev)
                if row.get("stopped"):
                    log(f"stopped after round {r} [{filt}] epoch 1 as asked; rerun to resume")
                    return {"stopped": True, "rows": rows}
                rows[filt].append(row)
                write_json(self.out / "state.json", {f: len(v) - 1 for f, v in rows.items()})
        return {"stopped": False, "rows": rows, "timings": self.timings}
