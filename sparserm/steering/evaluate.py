"""``sparserm steer evaluate MAP_DIR``: what steering does, against the unsteered model and a static baseline.

The config is the map's own (its manifest) with the command's ``key=value`` overrides; the items are eval-split
(``data.eval_fraction``, the prompt hash, so never a build triple) items of ``--data PATH`` (repeatable; default
``steer.data`` and ``data.sources``, one source per path), read as ``align`` reads them
(``align.prompts.load_tasks``): the first
``steer.eval.winrate_prompts`` unique prompts (tasks interleaved), ``hh_pairs`` pairs of the HH-style sources,
``mc_questions`` TruthfulQA questions of any TruthfulQA-format CSV.

Rows (variants), all on one loaded model and its two SAEs:

- ``unsteered``: the model as it is;
- ``steered@N``: prompt-conditional steering (``steer`` settings) by the map of the first N train-split triples:
  the map given, and one per ``steer.eval.map_sizes`` (``steer.max_triples``, 0: all), built into
  ``<out>/steer_eval/maps/triples-<N>`` with the given map's SAEs (the build is keyed by the triples, so each
  is its own map; a size the data cannot fill gives the same map as a larger one and one row);
- ``static@N``: the same latents for every prompt: the vector of the mean g over the given map's build triples
  (``densities.safetensors``), passed as fixed vectors, so it differs from ``steered@N`` only by the prompt
  conditioning.

Per row: the SparseRM win rate over the unsteered generations on the same prompts, seeds and batches (ties 1/2;
a 95% bootstrap interval over prompts; the unsteered row is its own baseline, 0.5), TruthfulQA MC1/MC2 and HH
likelihood harmlessness under the same steering (``steering.likelihood``: which positions are edited when an
answer is scored) with paired bootstrap intervals against unsteered, and the share of generated token positions
and of selected latents edited. The judge is ``steer.rm_dir``, else ``align.rm_dir``, else this config's
SparseRM trained (cached) into ``<out>/steer_eval/reward_model``. FLOPs: ``steering.flops``, per map size.

Each part of each row (``generations``: texts, RM scores and edit counts; ``mc``; ``harmless``) is stored under
``<out>/steer_eval/parts/<row>/<part>.json`` with the key of what produced it, and reused on a rerun while the key
holds. ``steer_eval.json`` / ``steer_eval.md`` (``steering.eval_report``) go in ``<out>`` (default: the map folder).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sparserm.config import Config, DataSource, replace, to_dict
from sparserm.manifest import folder_hash, model_key, stable_hash, write_json

UNSTEERED = "unsteered"


def log(msg: str) -> None:
    print(f"[steer evaluate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Items:
    prompts: list[str]
    hh_pairs: list[dict]
    mc: list  # MCQuestion


def _first(items: list, n: int) -> list:
    return items[:n] if n else items


def eval_items(cfg: Config, data: list[str] | None = None) -> Items:
    from sparserm.align.prompts import load_tasks

    given = tuple(DataSource(path=p) for p in data or ())
    both = {src.path: src for src in (*cfg.steer.data, *cfg.data.sources)}  # the steering data first
    sources = given or tuple(both.values())
    tasks = load_tasks(replace(cfg, data=replace(cfg.data, sources=sources)))
    per = [list(dict.fromkeys(p["prompt"] for p in t.eval_pairs)) for t in tasks]
    prompts = [x[i] for i in range(max((len(x) for x in per), default=0)) for x in per if i < len(x)]
    e = cfg.steer.eval
    hh = [p for t in tasks if t.task == "harmless" for p in t.eval_pairs]
    return Items(prompts[: e.winrate_prompts], _first(hh, e.hh_pairs), _first([q for t in tasks for q in t.mc],
                                                                                e.mc_questions))


@dataclass
class Variant:
    name: str
    map_dir: Path | None = None  # None: unsteered
    static: bool = False


def with_map_saes(cfg: Config, smap) -> Config:
    """``cfg`` naming the map's two SAE folders and layers (the sized maps are built on exactly those)."""
    s = replace(cfg.steer, input_sae_dir=smap.input.folder, output_sae_dir=smap.output.folder,
                input_sae_registry=None, output_sae_registry=None, input_layer=smap.input.layer,
                output_layer=smap.output.layer)
    return replace(cfg, steer=s)


def sized_maps(cfg: Config, map_dir: Path, work: Path) -> dict[int, Path]:
    """{number of triples: map folder}: the map given and one per ``steer.eval.map_sizes``."""
    from sparserm.steering.build import build_map
    from sparserm.steering.store import load_map

    given = load_map(map_dir)
    maps = {given.n_triples: map_dir}
    base = with_map_saes(cfg, given)
    for n in cfg.steer.eval.map_sizes:
        if n == given.cfg.steer.max_triples:
            continue  # the map given
        folder = work / "maps" / f"triples-{n or 'all'}"
        built = build_map(replace(base, steer=replace(base.steer, max_triples=n)), folder, progress=False)
        maps.setdefault(load_map(built).n_triples, built)
    return dict(sorted(maps.items()))


class SteerEvaluation:
    def __init__(self, cfg: Config, map_dir: Path, out: Path, rm_dir: str, items: Items):
        from sparserm.steering.generate import SteeredGenerator
        from sparserm.steering.store import load_map
        from sparserm.steering.vector import SteerSettings

        self.cfg, self.map_dir, self.out, self.items = cfg, Path(map_dir), Path(out), items
        self.work = self.out / "steer_eval"
        self.maps = sized_maps(cfg, self.map_dir, self.work)
        self.given = load_map(self.map_dir)
        self.base = SteeredGenerator.load(self.map_dir, cfg.run.cache_dir, cfg.model.device)
        self.rm_dir, self.rm_hash, self._rm = rm_dir, folder_hash(rm_dir), None
        self.settings = SteerSettings.of(cfg.steer).check()  # the map's steer settings, as overridden here
        g = cfg.align.generate
        self.max_tokens = g.max_prompt_tokens + g.max_new_tokens

    def variants(self) -> list[Variant]:
        out = [Variant(UNSTEERED)]
        out += [Variant(f"steered@{n}", d) for n, d in self.maps.items()]
        return out + [Variant(f"static@{self.given.n_triples}", self.map_dir, static=True)]

    def generator(self, v: Variant):
        from sparserm.steering.generate import SteeredGenerator
        from sparserm.steering.store import load_map

        if v.map_dir is None or Path(v.map_dir) == self.map_dir:
            return self.base
        b = self.base
        return SteeredGenerator(load_map(v.map_dir), b.model, b.tokenizer, b.hook.input_sae, b.hook.output_sae)

    def static_vector(self):
        from sparserm.steering.store import load_densities
        from sparserm.steering.vector import steering_vector

        G, _ = load_densities(self.map_dir)
        return steering_vector(G.mean(0), self.given.cmap, self.settings)

    def steering(self, v: Variant) -> tuple:
        """(settings, fixed vector) of a row: (None, None) unsteered, (settings, None) gated per prompt."""
        if v.map_dir is None:
            return None, None
        return self.settings, (self.static_vector() if v.static else None)

    def key(self, v: Variant, part: str) -> dict:
        from sparserm.steering.store import stored_key

        what = {"model": model_key(self.cfg.model)} if v.map_dir is None else {
            "map": stored_key(Path(v.map_dir)), "settings": asdict(self.settings), "static": v.static}
        i = self.items
        items = {"generations": [i.prompts, to_dict(self.cfg.align.generate), self.cfg.run.seed, self.rm_hash],
                 "mc": [q.question for q in i.mc], "harmless": [[p["prompt"], p["chosen"], p["rejected"]]
                                                                for p in i.hh_pairs] + [self.max_tokens]}[part]
        return {**what, "part": part, "items": stable_hash(items)}

    def part(self, v: Variant, name: str, compute) -> dict:
        path, key = self.work / "parts" / v.name / f"{name}.json", self.key(v, name)
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if stored.get("key") == key:
            log(f"{v.name} {name}: reused ({path})")
            return stored["value"]
        t0 = time.time()
        value = compute()
        write_json(path, {"key": key, "value": value, "seconds": round(time.time() - t0, 1)})
        log(f"{v.name} {name}: {time.time() - t0:.0f} s")
        return value

    @property
    def rm(self):
        if self._rm is None:
            from sparserm.reward.model import SparseRM

            self._rm = SparseRM.load(self.rm_dir)
        return self._rm

    def generate(self, v: Variant) -> dict:
        from sparserm.align.engines.base import Sampling
        from sparserm.align.prompts import with_instruction

        settings, vector = self.steering(v)
        gen, g = self.generator(v), self.cfg.align.generate
        sampling = Sampling.of(g)
        prompts = self.items.prompts
        convs = [with_instruction(p, None, 4 * g.max_prompt_tokens) for p in prompts]
        outs = []
        for b in range(0, len(convs), g.batch_size):
            n = len(convs[b: b + g.batch_size])
            outs += gen.generate(convs[b: b + n], [settings] * n, sampling, seed=self.cfg.run.seed + 999 + b,
                                 vectors=None if vector is None else [vector] * n)
        scores = self.rm.score(prompts, [o.text or "(empty)" for o in outs])
        return {"rows": [{"prompt": p, "response": o.text, "score": s, "n_tokens": o.n_tokens, "finished": o.finished,
                          "steering": o.steering} for p, o, s in zip(prompts, outs, scores)]}

    def mc(self, v: Variant) -> dict:
        from sparserm.steering.likelihood import truthfulqa

        return truthfulqa(self.generator(v), self.items.mc, *self.steering(v))

    def harmless(self, v: Variant) -> dict:
        from sparserm.steering.likelihood import harmless

        return harmless(self.generator(v), self.items.hh_pairs, self.max_tokens, *self.steering(v))

    def flops(self) -> dict:
        from sparserm.steering.flops import build_flops, compare, dpo_flops, weight_counts
        from sparserm.steering.store import load_map

        weights, t = weight_counts(self.base.model), self.cfg.align.train
        out = {}
        for n, folder in self.maps.items():
            smap = load_map(folder)
            tokens = json.loads((Path(folder) / "manifest.json").read_text())["map"]["tokens"]
            build = build_flops(weights, smap.output.layer, tokens, smap.output.d_in, smap.cmap.m_in,
                                smap.cmap.m_out, n)
            dpo = dpo_flops(weights, tokens, t.epochs, t.reference_online)
            out[str(n)] = {"build": build, "dpo": dpo, **compare(build, dpo)}
        return {"by_triples": out, "sae_training": self.sae_training_flops()}

    def sae_training_flops(self) -> dict:
        """Per side whose SAE was trained here (its sparserm_sae.json): the training's FLOPs (not in the ratio)."""
        from sparserm.sae.autoencoder import META_FILE
        from sparserm.steering.flops import sae_training_flops

        out = {}
        for side in (self.given.input, self.given.output):
            meta_file = Path(side.folder) / META_FILE
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            if meta.get("source") == "train" and meta.get("steps"):
                out[side.side] = sae_training_flops(side.d_in, side.d_sae, meta["steps"] * meta["batch_size"])
        return out

    def run(self) -> dict:
        rows = {}
        for v in self.variants():
            parts = {"generations": self.generate, "mc": self.mc, "harmless": self.harmless}
            rows[v.name] = {name: (self.part(v, name, lambda f=f: f(v)) if self._has(name) else {})
                            for name, f in parts.items()}
        return {"rows": rows, "flops": self.flops(), "maps": {str(n): str(d) for n, d in self.maps.items()}}

    def _has(self, part: str) -> bool:
        i = self.items
        return bool({"generations": i.prompts, "mc": i.mc, "harmless": i.hh_pairs}[part])


def judge(cfg: Config, work: Path) -> str:
    """``steer.rm_dir``, else ``align.rm_dir``, else this config's SparseRM (trained once into ``work``)."""
    from sparserm.align.rounds import own_reward_model

    return cfg.steer.rm_dir or cfg.align.rm_dir or own_reward_model(cfg, work / "reward_model")


def run_steer_evaluate(cfg: Config, map_dir: str | Path, out: str | Path | None = None,
                       data: list[str] | None = None) -> dict:
    """The evaluation of ``map_dir`` into ``out`` (default: the map folder); returns what ``steer_eval.json`` holds."""
    from sparserm.steering.eval_report import write_report

    t0 = time.time()
    map_dir = Path(map_dir)
    out = Path(out) if out else map_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.run.seed)
    items = eval_items(cfg, data)
    log(f"{len(items.prompts)} prompts, {len(items.hh_pairs)} HH pairs, {len(items.mc)} MC questions")
    ev = SteerEvaluation(cfg, map_dir, out, judge(cfg, out / "steer_eval"), items)
    result = ev.run()
    report = write_report(out, cfg, result, ev, seconds=round(time.time() - t0, 1))
    log(f"finished in {time.time() - t0:.0f} s: {out / 'steer_eval.md'}")
    return report
