"""``sparserm align``: R rounds of generate -> label by the task's rule -> filter by SparseRM -> DPO with
LoRA, for each filter side by side.

Layout of the output folder (every step writes its files atomically; a killed job rerun on the same folder
resumes at the first unfinished step and repeats nothing finished):

    round_0/eval.json, round_0/generations.jsonl     the base policy (shared by every filter)
    round_1/candidates.jsonl, generation.json        round-1 labelled pairs from the base policy (shared)
    <filter>/round_<r>/candidates.jsonl              r >= 2: pairs from that run's policy
    <filter>/round_<r>/pairs.jsonl, filter.json      kept pairs; RM agreement with the rule labels, kept share
    <filter>/round_<r>/train/                        Ray Train run (epoch checkpoints; resumes)
    <filter>/round_<r>/adapter/                      the round's LoRA adapter (safetensors)
    <filter>/round_<r>/metrics.json                  everything of the round; its presence marks it done
    state.json, report.md, report.json, metrics.png, manifest.json

Each step's output records the key of what produced it (its policy adapter's content, the RM's content,
the prompts, the generation and labelling settings, the seed). Labelled pairs made under another key are
refused with the fields that differ; an evaluation made under another key is recomputed (nothing
downstream depends on it). The DPO run has its own fingerprint (``trainer``).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import ray
from sparserm.progress import progress_bar

from sparserm.align.evaluate import harmless_likelihood, truthfulqa_mc, wins
from sparserm.align.filter import filter_pairs
from sparserm.align.labellers import LabelContext, PromptItem
from sparserm.align.pairs import make_pairs, sampling_of
from sparserm.align.prompts import TaskData, load_tasks, round_prompts, with_instruction
from sparserm.align.trainer import adapter_hash, dpo_key
from sparserm.config import Config, ConfigError, to_dict
from sparserm.manifest import check_key, folder_hash, model_key, read_jsonl, stable_hash, write_json, write_jsonl


def log(msg: str) -> None:
    print(f"[align {time.strftime('%H:%M:%S')}] {msg}", flush=True)


RM_SECTIONS = ("data", "model", "features", "sae", "reward")  # what a reward model trained by `rm train` depends on
# where it ran, not what it computed; sweep_k / sweep_folds / head_seeds serve `rm sweep` and `rm ablate` only
PLACEMENT = ("num_actors", "num_cpus", "num_gpus", "device", "torch_threads", "sweep_k", "sweep_folds", "head_seeds")


# fields added after reward models were keyed: at these values they train what those did, and stay out
RM_UNSET_WHEN = {"patience": 0}


def _without(section: dict | None, names: tuple[str, ...]) -> dict | None:
    return None if section is None else {k: v for k, v in section.items() if k not in names
                                         and not (k in RM_UNSET_WHEN and v == RM_UNSET_WHEN[k])}


def own_reward_model(cfg: Config, folder: Path) -> str:
    """``align.rm_dir`` unset: the reward model of this config, trained into ``folder`` (cached features) or
    reused from there when its manifest shows it was trained on the same data, model and settings."""
    key = {**{s: _without(to_dict(getattr(cfg, s)), PLACEMENT) for s in RM_SECTIONS}, "seed": cfg.run.seed}
    rm_dir, manifest = Path(folder) / "rm", Path(folder) / "manifest.json"
    if (rm_dir / "rm.json").is_file():
        stored = json.loads(manifest.read_text()) if manifest.is_file() else None
        check_key(None if stored is None else {**{s: _without(stored["config"].get(s), PLACEMENT) for s in RM_SECTIONS},
                                               "seed": stored.get("seed")}, key, rm_dir)
        return str(rm_dir)
    from sparserm.reward.stage import run_rm_train

    log("align.rm_dir is not set: training the reward model of this config first (cached features)")
    return str(run_rm_train(cfg, Path(folder)))


def _first(items: list, n: int) -> list:
    return items[:n] if n else items


class AlignJob:
    def __init__(self, cfg: Config, out: Path, rm_dir: str, stop_after: tuple[int, str] | None = None):
        # absolute: Ray Train workers run in their own working directory
        self.cfg, self.a, self.out, self.rm_dir = cfg, cfg.align, Path(out).resolve(), str(Path(rm_dir).resolve())
        self.stop_after = stop_after  # (round, filter): return after that round's DPO epoch 1, as a killed job would
        if cfg.align.train.finetune != "lora":  # the engines generate with each round's adapter
            raise ConfigError("align.train.finetune=full is for single runs (`sparserm fpo`): `sparserm align` "
                              "serves every round's policy as a LoRA adapter; use finetune=lora")
        self.tasks: list[TaskData] = load_tasks(cfg)
        g = self.a.generate
        self.max_tokens = g.max_prompt_tokens + g.max_new_tokens
        self.rm_hash = folder_hash(self.rm_dir)
        self.actors = None
        self.per_item: dict[str, dict[str, list[float]]] = {}  # "<filter>/<round>" -> per-item values
        timings = self.out / "timings.json"  # seconds per phase, summed over every invocation on this folder
        self.timings: dict[str, float] = json.loads(timings.read_text()) if timings.is_file() else {}

    # ------------------------------------------------------------ helpers
    def _actors(self):
        if self.actors is None:
            from sparserm.align.engines.factory import make_actors

            self.actors = make_actors(self.cfg, self.rm_dir)
            write_json(self.out / "placement.json", self.actors.placement)  # node and GPU of every actor
        return self.actors

    def _timed(self, key: str, t0: float) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + time.time() - t0, 1)
        write_json(self.out / "timings.json", self.timings)

    def _set_adapter(self, adapter: str | None) -> None:
        act = self._actors()
        act.pool.set_adapter(adapter)
        if act.pool.kind != "hf":
            ray.get(act.policy.set_adapter.remote(adapter))

    def _key(self, adapter: str | None, **extra) -> dict:
        return {"policy": adapter_hash(adapter), "rm": self.rm_hash, "model": model_key(self.cfg.model),
                "sampling": sampling_of(self.a), "seed": self.cfg.run.seed, **extra}

    def eval_key(self, adapter: str | None) -> dict:
        base = self.out / "round_0" / "eval.json"
        round0 = json.loads(base.read_text()).get("key") if adapter is not None and base.is_file() else None
        return self._key(adapter, eval=to_dict(self.a.eval), data=to_dict(self.cfg.data), round0=round0)

    def eval_prompts(self) -> list[tuple[str, str]]:
        per = [[(t.task, p["prompt"]) for p in t.eval_pairs] for t in self.tasks]
        out = []
        for i in range(max((len(x) for x in per), default=0)):  # interleave tasks
            out += [x[i] for x in per if i < len(x)]
        return out[: self.a.eval.winrate_prompts]

    def items(self, r: int) -> list[PromptItem]:
        out = []
        for t in self.tasks:
            for p in round_prompts(t, r, self.a.prompts_per_round):
                q = t.references.get(p)
                out.append(PromptItem(t.task, p, list(q.correct) if q else [], list(q.incorrect) if q else []))
        return out

    # ------------------------------------------------------------ steps
    def evaluate(self, adapter: str | None, gens_path: Path, name: str) -> dict:
        """Metrics of the policy with ``adapter``; writes its eval generations to ``gens_path``. One progress
        bar counts the TruthfulQA questions, HH pairs and win-rate prompts done."""
        t0 = time.time()
        self._set_adapter(adapter)
        act, e, out = self._actors(), self.a.eval, {}
        mc = _first([q for t in self.tasks for q in t.mc], e.mc_questions)
        hh = _first([p for t in self.tasks if t.task == "harmless" for p in t.eval_pairs], e.hh_pairs)
        items = self.eval_prompts()
        per_item: dict[str, list[float]] = {}
        with progress_bar(total=len(mc) + len(hh) + len(items), desc=f"align: evaluate {name}", unit="item") as bar:
            for part in (truthfulqa_mc(act.policy, mc, bar), harmless_likelihood(act.policy, hh, self.max_tokens, bar)):
                per_item.update(part.pop("per_item", {}))
                out.update(part)
            convs = [with_instruction(p, None, 4 * self.a.generate.max_prompt_tokens) for _, p in items]
            gens = act.pool.generate(convs, sampling_of(self.a), self.cfg.run.seed + 999, self.a.generate.batch_size,
                                     bar)
        if items:
            texts = [g["text"] or "(empty)" for g in gens]
            scores = ray.get(act.scorer.score.remote([p for _, p in items], texts))
            write_jsonl(gens_path, [{"task": t, "prompt": p, "response": r, "score": s}
                                    for (t, p), r, s in zip(items, texts, scores)])
            base = self.out / "round_0" / "generations.jsonl"
            base_scores = [g["score"] for g in read_jsonl(base)] if adapter is not None else scores
            per_item["rm_win_rate"] = wins(scores, base_scores)
            out["rm_win_rate"] = sum(per_item["rm_win_rate"]) / len(scores)
            out["rm_score_mean"] = sum(scores) / len(scores)
        out["per_item"] = per_item  # per question / pair / prompt: paired intervals between runs (report)
        self._timed("evaluate", t0)
        return out

    def candidates_key(self, r: int, adapter: str | None, items: list[PromptItem]) -> dict:
        g = self.a.generate
        return self._key(adapter, round=r, prompts=stable_hash([[i.task, i.prompt] for i in items]),
                         labellers=to_dict(g.labellers), n_samples=g.n_samples, judge_model=g.judge_model)

    def check_candidates(self, r: int, adapter: str | None, folder: Path) -> dict:
        """The stored generation stats, refused (naming what differs) when other settings made the pairs."""
        meta = folder / "generation.json"
        stats = json.loads(meta.read_text()) if meta.is_file() else {}
        check_key(stats.get("key"), self.candidates_key(r, adapter, self.items(r)), folder / "candidates.jsonl")
        return stats

    def candidates(self, r: int, adapter: str | None, folder: Path) -> tuple[list[dict], dict]:
        path, meta = folder / "candidates.jsonl", folder / "generation.json"
        if path.is_file():
            return read_jsonl(path), self.check_candidates(r, adapter, folder)
        items = self.items(r)
        key = self.candidates_key(r, adapter, items)
        t0 = time.time()
        self._set_adapter(adapter)
        act = self._actors()
        pairs, stats = make_pairs(act.pool, LabelContext(act.scorer, act.judge), items, self.a,
                                  self.cfg.run.seed * 1000 + r, label=f"align: round {r} generate")
        t1 = time.time()
        unscored = [p for p in pairs if "score_chosen" not in p]  # ranked pairs come with their scores
        if unscored:
            s_w, s_l = ray.get(act.scorer.score_pairs.remote([p["prompt"] for p in unscored],
                                                             [p["chosen"] for p in unscored],
                                                             [p["rejected"] for p in unscored]))
            for p, sw, sl in zip(unscored, s_w, s_l):
                p.update(score_chosen=sw, score_rejected=sl)
        stats.update(generate_s=round(t1 - t0, 1), score_s=round(time.time() - t1, 1), key=key)
        write_json(meta, stats)
        write_jsonl(path, pairs)
        self._timed("generate+label+score", t0)
        log(f"round {r}: {len(pairs)} labelled pairs from {len(items)} prompts, dropped {stats['dropped']} "
            f"({stats['generate_s']} s generation and labelling, {stats['score_s']} s RM scoring)")
        return pairs, stats

    def train(self, r: int, filt: str, folder: Path, kept: list[dict], prev_adapter: str | None) -> dict | None:
        """The round's DPO (skipped when ``train.json`` exists); None when stopped as asked."""
        from sparserm.align.trainer import train_dpo

        done, key = folder / "train.json", dpo_key(self.cfg, kept, prev_adapter)
        if done.is_file():
            stored = json.loads(done.read_text())
            check_key(stored.get("key") if isinstance(stored, dict) else None, key, folder / "adapter")
            return stored
        t0 = time.time()
        if self.actors is not None:
            self.actors.pool.sleep()  # the engines' GPU memory is the trainer's while it runs
        stop = self.a.train.epochs if self.stop_after != (r, filt) else 1
        res = train_dpo(self.cfg, kept, storage_dir=folder, name="train", init_adapter=prev_adapter,
                        stop_after_epoch=stop)
        if not res["finished"]:
            return None
        adapter_dir = folder / "adapter"
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        shutil.copytree(res["adapter"], adapter_dir)
        write_json(done, {"key": key, "history": res["history"]})
        self._timed("dpo", t0)
        return {"history": res["history"]}

    def round_eval(self, adapter: str | None, folder: Path, name: str) -> dict:
        """The policy's metrics, reused when ``eval.json`` holds them under the same key, else recomputed;
        the per-item values are kept in ``self.per_item[name]`` for the report's paired intervals."""
        path, key = folder / "eval.json", self.eval_key(adapter)
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if stored and stored.get("key") != key:
            log(f"{path}: evaluation settings or inputs changed; evaluating again")
        if stored.get("key") != key:
            stored = {"key": key, "metrics": self.evaluate(
                adapter, folder / ("generations.jsonl" if adapter is None else "eval_generations.jsonl"), name)}
            write_json(path, stored)
        metrics = dict(stored["metrics"])
        self.per_item[name] = metrics.pop("per_item", {})
        return metrics

    def run_round(self, r: int, filt: str, prev_adapter: str | None) -> dict:
        folder = self.out / filt / f"round_{r}"
        folder.mkdir(parents=True, exist_ok=True)
        shared = self.out / "round_1" if r == 1 else folder  # round-1 pairs come from the base policy
        cands, gstats = self.candidates(r, prev_adapter, shared)
        kept, fstats = filter_pairs([dict(p) for p in cands], [p["score_chosen"] for p in cands],
                                    [p["score_rejected"] for p in cands], filt)
        write_jsonl(folder / "pairs.jsonl", kept)
        write_json(folder / "filter.json", fstats)
        log(f"round {r} [{filt}]: kept {fstats['n_kept']}/{fstats['n_pairs']} pairs; the RM agrees with the rule "
            f"labels on {fstats['rm_agreement']:.2f} ({fstats['rm_agreement_per_task']})")
        if not kept:
            raise ValueError(f"round {r} [{filt}]: nothing to train on: the filter kept 0 of {fstats['n_pairs']} "
                             f"labelled pairs (the labellers dropped {gstats.get('dropped', {})}); raise "
                             "align.prompts_per_round or choose another labeller")
        train = self.train(r, filt, folder, kept, prev_adapter)
        if train is None:
            return {"stopped": True}
        metrics = self.round_eval(str(folder / "adapter"), folder, f"{filt}/{r}")
        last = train["history"][-1]
        row = {"round": r, "filter": filt,
               **{k: fstats[k] for k in ("n_pairs", "n_kept", "kept_share", "rm_agreement", "rm_agreement_per_task")},
               "dropped_by_labeller": gstats.get("dropped", {}), "dpo_loss": last["loss"],
               "dpo_reward_accuracy": last["reward_accuracy"], **metrics}
        write_json(folder / "metrics.json", row)
        log(f"round {r} [{filt}] done: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                          for k, v in row.items()}))
        return row

    # ------------------------------------------------------------ the job
    def run(self) -> dict:
        """Every round of every filter (call :meth:`check_finished` first, as ``run_align`` does, before writing
        anything); the actors are released on the way out, also on an error."""
        try:
            return self._run()
        finally:
            if self.actors is not None:
                self.actors.close()
                self.actors = None

    def _prev(self, r: int, filt: str) -> str | None:
        return str(self.out / filt / f"round_{r - 1}" / "adapter") if r > 1 else None

    def check_finished(self) -> None:
        """Every finished round's stored pairs and adapter against the current settings, before any work: a changed
        generation or training setting is refused (naming it) with nothing evaluated again or overwritten."""
        for r in range(1, self.a.rounds + 1):
            for filt in self.a.filters:
                folder = self.out / filt / f"round_{r}"
                if (folder / "metrics.json").is_file():
                    self.check_candidates(r, self._prev(r, filt), self.out / "round_1" if r == 1 else folder)
                    self.train(r, filt, folder, read_jsonl(folder / "pairs.jsonl"), self._prev(r, filt))

    def _run(self) -> dict:  # finished rounds' keys: checked by check_finished, which run_align calls first
        round0 = {"round": 0, **self.round_eval(None, self.out / "round_0", "base/0")}
        log("round 0 (base policy): " + json.dumps(round0))
        rows = {f: [dict(round0, filter=f)] for f in self.a.filters}
        for r in range(1, self.a.rounds + 1):
            for filt in self.a.filters:
                done = self.out / filt / f"round_{r}" / "metrics.json"
                adapter = self.out / filt / f"round_{r}" / "adapter"
                prev = self._prev(r, filt)
                if done.is_file():  # a finished round (its keys checked by check_finished): its metrics
                    row = json.loads(done.read_text())
                    metrics = self.round_eval(str(adapter), done.parent, f"{filt}/{r}")  # same key: read back
                    if any(row.get(k) != v for k, v in metrics.items()):
                        row.update(metrics)
                        write_json(done, row)
                    rows[filt].append(row)
                    continue
                row = self.run_round(r, filt, prev)
                if row.get("stopped"):
                    log(f"stopped after round {r} [{filt}] epoch 1 as asked; rerun to resume")
                    return {"stopped": True, "rows": rows}
                rows[filt].append(row)
                write_json(self.out / "state.json", {f: len(v) - 1 for f, v in rows.items()})
        return {"stopped": False, "rows": rows, "timings": self.timings, "per_item": self.per_item}
