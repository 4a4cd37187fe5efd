"""``sparserm fpo CONFIG``: the objectives of ``fpo.methods`` (default dpo, simpo, tdpo2, fpo) trained with the
one preference trainer on the same pairs and steps, from the base model (LoRA), then measured side by side.

Every method gets the same ``align.train`` settings and the same ``fpo.train_pairs`` training-split pairs; only
``align.loss.name`` changes (``align.loss.beta`` unset: each objective's own default). FPO's SAE is
``align.loss.fpo_sae_dir``, else the SAE the config's SparseRM was built with (``rm.json``'s ``sae.path``: for
``sae.source: train`` the trained-SAE cache folder ``sparserm.sae.stage.trained_sae_dir``), at the layer it
records unless ``align.loss.fpo_layer`` says otherwise. Data: ``data.sources`` loaded and split as the reward
model's stages do (``sparserm.features.stage.prepare_data``: the loaders, ``max_pairs`` / ``max_per_prompt``,
the prompt-hash split); each source shuffled by the seed and the sources interleaved, training pairs from the
train split, held-out pairs, prompts and TruthfulQA questions from the eval split.

Per policy (the base and each trained adapter), through one HFPolicy actor (``set_adapter``) and one
RewardScorer:

- ``accuracy``: held-out pairs where the length-normalised log-prob of chosen is above rejected's
  (``align.evaluate.harmless_likelihood``, ties wrong), on ``fpo.heldout_pairs`` pairs;
- ``entropy``: the mean over sampled generations (``align.generate`` sampling, ``fpo.entropy_prompts`` held-out
  prompts) of the mean per-token predictive entropy (nats, full softmax at temperature 1) of the policy along
  its own response: (1/|y|) sum_t H(pi(. | x, y_<t)); an empty response counts its first position. Why: FPO
  follows TDPO in measuring diversity by the policy's predictive entropy on its own samples (exact per step);
- ``win_rate``: on ``fpo.winrate_prompts`` held-out prompts, the share where the SparseRM scores the policy's
  generation above the base model's (ties 1/2; the base is 0.5 by definition);
- ``mc1`` / ``mc2``: TruthfulQA as lm-eval computes them (``align.truthfulqa_mc``), ``fpo.mc_questions``
  eval-split questions (0: all);
- from the trainer's per-epoch history: ``peak_rss_mb_above_baseline`` and ``peak_gpu_mb`` (max over epochs),
  ``seconds_per_step`` (mean over epochs); None where the trainer does not record them. ``train_seconds`` is
  the wall time of the invocation that finished training.

Paired bootstrap intervals (``reward.accuracy.paired_difference``, ``fpo.bootstrap`` resamples): FPO minus each
other method and minus the base on every per-item metric (same pairs, prompts and questions on both sides).

Layout (a rerun on the same folder recomputes nothing finished)::

    reward_model/                    the SparseRM of this config, when align.rm_dir is unset (rounds.own_reward_model)
    <method>/train/                  Ray Train run (epoch checkpoints; train_dpo resumes or refuses by its fingerprint)
    <method>/train.json, adapter/    {key (dpo_key), history, seconds}; the trained LoRA adapter
    <policy>/eval.json               {key, metrics, per_item}; recomputed only when its key changes
    <policy>/generations.jsonl       prompt, response, RM score (policy: base or a method)
    fpo.json, fpo.md, manifest.json
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray

from sparserm.config import Config, ConfigError
from sparserm.manifest import check_key, folder_hash, model_key, read_jsonl, stable_hash, write_json, write_jsonl

BASE = "base"


def log(msg: str) -> None:
    print(f"[fpo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ inputs
def sae_of_rm(rm_dir: str) -> str | None:
    """The SAE folder a SparseRM was built with: ``rm.json``'s ``sae.path``, else ``sae_dir`` of the manifest of
    the ``rm train`` run that wrote it."""
    meta = json.loads(Path(rm_dir, "rm.json").read_text())
    path = (meta.get("sae") or {}).get("path")
    manifest = Path(rm_dir).parent / "manifest.json"
    if not path and manifest.is_file():
        path = json.loads(manifest.read_text()).get("sae_dir")
    return path if path and Path(path, "cfg.json").is_file() else None


def with_sae(cfg: Config, rm_dir: str) -> tuple[Config, str]:
    """``cfg`` with ``align.loss.fpo_sae_dir`` set (the RM's SAE when unset) and where it came from."""
    from sparserm.align.objectives import get_objective
    from sparserm.align.references import uses_features

    loss = cfg.align.loss
    if not any(uses_features(get_objective(m)) for m in cfg.fpo.methods):
        return cfg, "unused"
    if loss.fpo_sae_dir:
        return cfg, "align.loss.fpo_sae_dir"
    sae = sae_of_rm(rm_dir)
    if sae is None:
        raise ValueError(f"align.loss.fpo_sae_dir is unset and the reward model {rm_dir} records no SAE folder "
                         "(a registry SAE, or a hand-made RM): set align.loss.fpo_sae_dir to a sae-lens SAE folder")
    cfg = replace(cfg, align=replace(cfg.align, loss=replace(loss, fpo_sae_dir=sae)))
    return cfg, f"the reward model's SAE ({rm_dir})"


def method_config(cfg: Config, name: str) -> Config:
    return replace(cfg, align=replace(cfg.align, loss=replace(cfg.align.loss, name=name)))


def _interleaved(rows: list[dict], seed: str) -> list[dict]:
    """Each source's rows shuffled by ``seed``, then the sources taken in turn (equal shares while both last)."""
    per: dict[str, list[dict]] = {}
    for r in rows:
        per.setdefault(r["source"], []).append(r)
    for src, items in per.items():
        random.Random(f"{seed}:{src}").shuffle(items)
    out, groups = [], list(per.values())
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def _first(items: list, n: int) -> list:
    return items[:n] if n else items


@dataclass
class CompareData:
    train: list[dict]
    heldout: list[dict]
    prompts: list[str]  # unique held-out prompts (entropy and win rate read the first ones)
    mc: list  # eval-split TruthfulQA questions


def compare_data(cfg: Config) -> CompareData:
    from sparserm.align.prompts import task_of
    from sparserm.data import is_eval, load_truthfulqa_mc
    from sparserm.features.stage import prepare_data

    f, seed = cfg.fpo, cfg.run.seed
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected", "source", "row_id", "split")}
            for r in prepare_data(cfg).rows]
    train = _first(_interleaved([r for r in rows if r["split"] == "train"], f"{seed}:fpo-train"), f.train_pairs)
    held = _interleaved([r for r in rows if r["split"] == "eval"], f"{seed}:fpo-eval")
    prompts = list(dict.fromkeys(r["prompt"] for r in held))[: max(f.entropy_prompts, f.winrate_prompts)]
    mc = [q for s in cfg.data.sources if task_of(s.path, s.format) == "truthfulqa"
          for q in load_truthfulqa_mc(s.path) if is_eval(q.question, cfg.data.eval_fraction, cfg.data.split_salt)]
    return CompareData(train, _first(held, f.heldout_pairs), prompts, _first(mc, f.mc_questions))


# ------------------------------------------------------------------ the job
class FPOCompare:
    def __init__(self, cfg: Config, out: Path, rm_dir: str, data: CompareData):
        g = cfg.align.generate
        self.cfg, self.out, self.rm_dir, self.data = cfg, Path(out).resolve(), str(Path(rm_dir).resolve()), data
        self.max_tokens = g.max_prompt_tokens + g.max_new_tokens
        self.actors = None
        self.rm_hash = folder_hash(self.rm_dir)

    def _actors(self):
        if self.actors is None:
            from sparserm.align.engines.factory import make_actors

            self.actors = make_actors(self.cfg, self.rm_dir)
        return self.actors

    def train(self, name: str) -> dict:
        """One method's adapter, trained unless ``<name>/train.json`` holds it under the same key."""
        from sparserm.align.trainer import dpo_key, train_dpo

        cfg, folder = method_config(self.cfg, name), self.out / name
        done, key = folder / "train.json", dpo_key(cfg, self.data.train, None)
        if done.is_file():
            stored = json.loads(done.read_text())
            check_key(stored.get("key"), key, folder / "adapter")
            log(f"train {name}: reused ({done})")
            return stored
        t0 = time.time()
        res = train_dpo(cfg, self.data.train, storage_dir=folder, name="train", progress=False)
        if not res["finished"]:
            raise RuntimeError(f"train {name}: the run stopped before its last epoch; rerun to resume")
        if (folder / "adapter").exists():
            shutil.rmtree(folder / "adapter")
        shutil.copytree(res["adapter"], folder / "adapter")
        stored = {"key": key, "history": res["history"], "seconds": round(time.time() - t0, 1)}
        write_json(done, stored)
        last = res["history"][-1]
        log(f"train {name}: {len(self.data.train)} pairs x {len(res['history'])} epoch(s) in {stored['seconds']} s, "
            f"loss {last['loss']:.4f}, reward accuracy {last['reward_accuracy']:.3f}")
        return stored

    def eval_key(self, adapter: str | None) -> dict:
        from sparserm.align.pairs import sampling_of
        from sparserm.align.trainer import adapter_hash

        f, d = self.cfg.fpo, self.data
        base = self.out / BASE / "eval.json"
        return {"policy": adapter_hash(adapter), "rm": self.rm_hash, "model": model_key(self.cfg.model),
                "sampling": sampling_of(self.cfg.align), "seed": self.cfg.run.seed, "max_tokens": self.max_tokens,
                "batch_size": self.cfg.align.generate.batch_size, "entropy_prompts": f.entropy_prompts,
                "winrate_prompts": f.winrate_prompts,
                "items": stable_hash([[[p["prompt"], p["chosen"], p["rejected"]] for p in d.heldout], d.prompts,
                                      [q.question for q in d.mc]]),
                "base": json.loads(base.read_text())["key"] if adapter is not None else None}

    def evaluate(self, name: str, adapter: str | None) -> dict:
        """``{"metrics", "per_item"}`` of a policy, read back from ``<name>/eval.json`` under the same key."""
        path, key = self.out / name / "eval.json", self.eval_key(adapter)
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if stored.get("key") == key:
            log(f"evaluate {name}: reused ({path})")
            return stored
        if stored:
            log(f"evaluate {name}: settings or inputs changed since {path}; evaluating again")
        t0 = time.time()
        stored = {"key": key, **self._measure(name, adapter)}
        stored["metrics"]["eval_seconds"] = round(time.time() - t0, 1)
        write_json(path, stored)
        log(f"evaluate {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in stored["metrics"].items()
                                              if isinstance(v, float)))
        return stored

    def _measure(self, name: str, adapter: str | None) -> dict:
        """``_measure_with`` under one progress bar of held-out pairs, prompts and TruthfulQA questions done."""
        from sparserm.progress import progress_bar

        d = self.data
        with progress_bar(total=len(d.heldout) + len(d.prompts) + len(d.mc), desc=f"fpo: evaluate {name}",
                          unit="item") as bar:
            return self._measure_with(name, adapter, bar)

    def _measure_with(self, name: str, adapter: str | None, bar) -> dict:
        from sparserm.align.evaluate import harmless_likelihood, truthfulqa_mc, wins
        from sparserm.align.pairs import sampling_of
        from sparserm.align.prompts import with_instruction

        act, f, a, d = self._actors(), self.cfg.fpo, self.cfg.align, self.data
        act.pool.set_adapter(adapter)
        if act.pool.kind != "hf":
            ray.get(act.policy.set_adapter.remote(adapter))
        metrics, per_item = {}, {}
        acc = harmless_likelihood(act.policy, d.heldout, self.max_tokens, bar)
        if acc:
            per_item["accuracy"] = acc["per_item"]["harmless"]
            metrics.update(accuracy=acc["harmless"], n_heldout_pairs=acc["n_harmless"])
        if d.prompts:
            convs = [with_instruction(p, None, 4 * a.generate.max_prompt_tokens) for p in d.prompts]
            texts = [g["text"] for g in act.pool.generate(convs, sampling_of(a), self.cfg.run.seed + 999,
                                                          a.generate.batch_size, bar)]
            n_e, n_w = min(f.entropy_prompts, len(texts)), min(f.winrate_prompts, len(texts))
            if n_e:
                per_item["entropy"] = ray.get(act.policy.response_entropy.remote(
                    list(zip(d.prompts[:n_e], texts[:n_e])), self.max_tokens))
                metrics.update(entropy=sum(per_item["entropy"]) / n_e, n_entropy_prompts=n_e)
            scores = ray.get(act.scorer.score.remote(d.prompts, [t or "(empty)" for t in texts]))
            write_jsonl(self.out / name / "generations.jsonl", [{"prompt": p, "response": t, "score": s}
                                                                for p, t, s in zip(d.prompts, texts, scores)])
            if n_w:
                base = scores if adapter is None else [g["score"] for g in
                                                       read_jsonl(self.out / BASE / "generations.jsonl")]
                per_item["win_rate"] = wins(scores[:n_w], base[:n_w])
                metrics.update(win_rate=sum(per_item["win_rate"]) / n_w, n_winrate_prompts=n_w,
                               rm_score_mean=sum(scores[:n_w]) / n_w)
        mc = truthfulqa_mc(act.policy, d.mc, bar)
        if mc:
            per_item.update(mc.pop("per_item"))
            metrics.update(mc)
        return {"metrics": metrics, "per_item": per_item}

    def run(self) -> dict:
        """Train every method, then evaluate the base and each adapter; the actors are released on the way out."""
        try:
            trained = {m: self.train(m) for m in self.cfg.fpo.methods}
            evals = {BASE: self.evaluate(BASE, None)}
            for m in self.cfg.fpo.methods:
                evals[m] = self.evaluate(m, str(self.out / m / "adapter"))
            return {"trained": trained, "evals": evals, "n_train_pairs": len(self.data.train)}
        finally:
            if self.actors is not None:
                self.actors.close()
                self.actors = None


def run_fpo_compare(cfg: Config, out: Path) -> dict:
    """The comparison into ``out``; returns what ``fpo.json`` holds."""
    from sparserm.align.references import feature_source
    from sparserm.align.rounds import own_reward_model
    from sparserm.fpo.report import write_report
    from sparserm.manifest import write_manifest
    from sparserm.ray_train import ensure_ray

    t0 = time.time()
    if getattr(cfg.align.train, "finetune", "lora") != "lora":
        raise ConfigError(f"align.train.finetune={cfg.align.train.finetune!r}: `sparserm fpo` compares LoRA adapters "
                          "on one policy actor (set_adapter); use lora")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray(cfg.run.ray_address)
    rm_dir = cfg.align.rm_dir or own_reward_model(cfg, out / "reward_model")
    cfg, sae_from = with_sae(cfg, rm_dir)
    sae = dict(zip(("dir", "layer"), feature_source(cfg.align.loss))) if sae_from != "unused" else {}
    data = compare_data(cfg)
    t = cfg.align.train
    steps = -(-len(data.train) // t.batch_size) * t.epochs
    log(f"{', '.join(cfg.fpo.methods)} on {len(data.train)} training pairs x {t.epochs} epoch(s) ({steps} steps "
        f"each); {len(data.heldout)} held-out pairs, {len(data.prompts)} prompts, {len(data.mc)} MC questions; "
        f"SAE {sae.get('dir')} layer {sae.get('layer')} from {sae_from}")
    write_manifest(out, cfg, "fpo", extra={"rm_dir": rm_dir, "fpo_sae": {**sae, "resolved_from": sae_from},
                                           "n_train_pairs": len(data.train), "steps_per_method": steps})
    result = FPOCompare(cfg, out, rm_dir, data).run()
    report = write_report(out, cfg, result, sae={**sae, "resolved_from": sae_from})
    log(f"finished in {time.time() - t0:.0f} s; report: {out / 'fpo.md'}")
    return report
