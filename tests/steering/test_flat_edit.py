"""The steering of a flattened vLLM-style token batch (``steering.flat_edit``) against the transformers hook, and the
vLLM worker's glue (``steering.vllm_worker.Steering``) on a fake runner and model: CPU, tiny random SAEs, no vLLM."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparserm.sae.autoencoder import SparseAutoencoder
from sparserm.steering.conditional_map import ConditionalMap, activation_density
from sparserm.steering.flat_edit import (PromptDensity, edit_flat, gate_slots, pack_vectors, prompt_counts,
                                         token_layout, token_rows)
from sparserm.steering.hook import SteeringHook, SteerRun
from sparserm.steering.vector import SteerSettings, steering_vector
from sparserm.steering.vllm_worker import PAYLOAD, Steering, steering_extra_args

# an edited stream of the flat batch against the request alone: the same fp32 GEMMs at other batch shapes, whose
# kernels (AVX-512 / AMX) sum in other orders; 2.1e-6 seen on a Xeon, against edits of order 0.1-1
FP32_TOL = 1e-5

D = 64  # the tiny SAEs' d_in


@pytest.fixture(scope="module")
def hook(tiny_saes):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(128, 128, generator=g) * (torch.rand(128, 128, generator=g) < 0.2)
    saes = [SparseAutoencoder.load(folder) for folder in tiny_saes]
    return SteeringHook(None, ConditionalMap.from_dense(A), *saes, input_layer=1, output_layer=2)


def stream(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def gated_vector(hook, prompt: torch.Tensor, settings: SteerSettings):
    """The hook's own gate on one prompt [P, d] alone: its vector."""
    run = SteerRun(torch.ones(1, len(prompt)), [settings], [None])
    hook._gate(run)(None, None, prompt[None])
    return run.vectors[0]


def hook_alone(hook, h: torch.Tensor, prompt_len: int, vector) -> tuple[torch.Tensor, dict]:
    """One request steered alone by the transformers hook: its stream [L, d] after the output block, the prompt
    forward then one forward per later token, and its counts."""
    run = SteerRun(torch.ones(1, prompt_len), [None], [vector])
    run.pack("cpu")
    edit = hook._edit(run)
    out = edit(None, None, h[None, :prompt_len])
    rows = [h[:prompt_len] if out is None else out[0]]
    for p in range(prompt_len, len(h)):
        out = edit(None, None, h[None, p:p + 1])
        rows.append(h[p:p + 1] if out is None else out[0])
    return torch.cat(rows), run.counts([len(h) - prompt_len + 1])[0]


# request -> (prompt length, total length); each forward: (request, first position, tokens), 2 padding tokens after
LENGTHS = {"a": (5, 9), "b": (7, 10), "c": (3, 6)}
FORWARDS = [[("a", 0, 5), ("b", 0, 4), ("c", 0, 3)], [("a", 5, 1), ("b", 4, 3), ("c", 3, 1)],
            [("b", 7, 1), ("a", 6, 1), ("c", 4, 1)], [("a", 7, 1), ("c", 5, 1), ("b", 8, 1)],
            [("b", 9, 1), ("a", 8, 1)]]


def flat_batch(streams: dict, forward: list) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """One forward's h [N, d] (2 padding tokens last), query_start_loc and positions."""
    h = torch.cat([streams[r][s:s + n] for r, s, n in forward] + [torch.zeros(2, D)])
    qsl = np.cumsum([0] + [n for _, _, n in forward])
    positions = torch.tensor([p for _, s, n in forward for p in range(s, s + n)] + [0, 0])
    return h, qsl, positions


def test_token_layout_marks_requests_prompts_and_emitting_tokens():
    lay = token_layout(np.array([0, 3, 4, 6]), torch.tensor([0, 1, 2, 9, 4, 5, 0]), [3, 4, 6])
    assert lay.request.tolist() == [0, 0, 0, 1, 2, 2, -1]
    assert lay.prompt.tolist() == [True, True, True, False, True, True, False]
    assert lay.emits.tolist() == [False, False, True, True, False, True, False]  # last prompt token on
    assert token_rows(lay.request, torch.tensor([-1, 0, 1])).tolist() == [-1, -1, -1, 0, 1, 1, -1]


@pytest.mark.parametrize("mode", ["add", "ablate"])
def test_flat_edit_of_a_mixed_batch_is_each_request_alone_through_the_hook(hook, mode):
    settings = {"a": SteerSettings(0.5, mode, 8, 40), "b": SteerSettings(2.0, mode, 8, 20)}  # c: not steered
    streams = {r: stream(i, LENGTHS[r][1]) for i, r in enumerate(LENGTHS)}
    vectors = {r: gated_vector(hook, streams[r][:LENGTHS[r][0]], s) for r, s in settings.items()}
    want = {r: hook_alone(hook, streams[r], LENGTHS[r][0], vectors[r])[0] for r in settings}
    rows, packed = pack_vectors([vectors["a"], vectors["b"]], "cpu")
    assert rows == [0, 1]
    moved = 0
    for forward in FORWARDS:
        h, qsl, positions = flat_batch(streams, forward)
        lay = token_layout(qsl, positions, [LENGTHS[r][0] for r, _, _ in forward])
        row = torch.tensor([{"a": 0, "b": 1}.get(r, -1) for r, _, _ in forward])
        edit = edit_flat(h, token_rows(lay.request, row), lay.emits, packed, hook.output_sae)
        out = edit.apply(h)
        moved += int(edit.moved.sum())
        for t in range(len(h)):
            r = forward[int(lay.request[t])][0] if lay.request[t] >= 0 else None
            if r in want and lay.emits[t]:
                torch.testing.assert_close(out[t], want[r][int(positions[t])], rtol=FP32_TOL, atol=FP32_TOL)
            else:  # unsteered, padding, or a prompt token that emits nothing: bit for bit
                assert torch.equal(out[t], h[t])
    assert moved > 0  # the test edits something


def test_alpha_zero_changes_nothing(hook):
    settings = SteerSettings(0.0, "add", 8, 40)
    streams = {r: stream(10 + i, LENGTHS[r][1]) for i, r in enumerate(LENGTHS)}
    vector = gated_vector(hook, streams["a"][:5], settings)
    assert len(vector.latents)
    _, packed = pack_vectors([vector], "cpu")
    for forward in FORWARDS:
        h, qsl, positions = flat_batch(streams, forward)
        lay = token_layout(qsl, positions, [LENGTHS[r][0] for r, _, _ in forward])
        row = torch.tensor([0 if r == "a" else -1 for r, _, _ in forward])
        edit = edit_flat(h, token_rows(lay.request, row), lay.emits, packed, hook.output_sae)
        assert not edit.moved.any() and edit.apply(h) is h and len(edit.tokens) == lay.emits[lay.request == 0].sum()


def test_chunked_gate_sums_to_the_one_shot_density_and_vector(hook):
    settings = SteerSettings(0.5, "add", 8, 40)
    streams = {"a": stream(20, 9), "b": stream(21, 6), "c": stream(22, 4)}
    prompt = {"a": 9, "b": 6, "c": 4}
    # a: chunks 0-3, 4-6 then 7-8 with 0-3 recomputed in between (a preemption); b: one chunk; c: not gated
    forwards = [[("a", 0, 4), ("c", 0, 4)], [("b", 0, 6), ("a", 4, 3)], [("a", 0, 4)], [("a", 7, 2)]]
    acc = {r: PromptDensity(torch.zeros(hook.cmap.m_in)) for r in ("a", "b")}
    for forward in forwards:
        h, qsl, positions = flat_batch(streams, forward)
        lay = token_layout(qsl, positions, [prompt[r] for r, _, _ in forward])
        gated = [r for r, _, _ in forward if r in acc]
        slot = torch.tensor([gated.index(r) if r in acc else -1 for r, _, _ in forward])
        seen = torch.tensor([acc[r].n if r in acc else 0 for r, _, _ in forward])
        active, n = prompt_counts(h, gate_slots(lay, slot, seen), len(gated), hook.input_sae)
        for j, r in enumerate(gated):
            acc[r].add(active[j], int(n[j]))
    for r in ("a", "b"):
        assert acc[r].n == prompt[r]
        one_shot = activation_density(hook.input_sae.encode(streams[r][:prompt[r]]))
        assert torch.equal(acc[r].density(), one_shot) and torch.equal(one_shot, hook.prompt_density(streams[r]))
        want = gated_vector(hook, streams[r], settings)
        got = steering_vector(acc[r].density(), hook.cmap, settings)
        assert got.describe() == want.describe() and len(got.latents)


class FakeLayer(torch.nn.Module):
    """A vLLM-style decoder layer over single tokens: (positions, hidden, residual) -> (hidden, residual), the
    stream after it hidden + residual."""

    def __init__(self, seed: int):
        super().__init__()
        self.w = torch.randn(D, D, generator=torch.Generator().manual_seed(seed)) / D ** 0.5

    def forward(self, positions, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return torch.tanh(residual @ self.w), residual


class FakeRunner:
    """The V1 runner's batch state (``input_batch.req_ids``, ``query_start_loc.np``) over FakeLayers; a step's
    ``schedule`` lists (req_id, first position, tokens)."""

    def __init__(self, embed: dict):
        self.embed, self.layers = embed, torch.nn.ModuleList(FakeLayer(i) for i in range(4))
        self.input_batch, self.query_start_loc = SimpleNamespace(req_ids=[], num_reqs=0), SimpleNamespace(np=None)
        self.tokens: list[tuple[str, int]] = []  # (request, position) of each token of the forward under way

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        sched = scheduler_output.schedule
        self.input_batch.req_ids, self.input_batch.num_reqs = [r for r, _, _ in sched], len(sched)
        self.query_start_loc.np = np.cumsum([0] + [n for _, _, n in sched])
        self.tokens = [(r, p) for r, s, n in sched for p in range(s, s + n)]
        hidden, residual = torch.cat([self.embed[r][s:s + n] for r, s, n in sched]), None
        positions = torch.tensor([p for _, p in self.tokens])
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)


def test_the_worker_steers_each_request_of_a_fake_engine_as_the_hook_does_alone(hook):
    lengths = {"r-a": (5, 9), "r-b": (7, 10), "r-c": (3, 6)}
    settings = {"r-a": SteerSettings(0.5, "add", 8, 40), "r-b": SteerSettings(1.0, "ablate", 8, 40)}
    runner = FakeRunner({r: stream(30 + i, lengths[r][1]) for i, r in enumerate(lengths)})
    steering = Steering(hook.cmap, hook.input_sae, hook.output_sae, runner.layers, 1, 2, runner)
    seen = {}  # (block or "plain", request, position) -> the stream after block 2 after / before the steering hooks
    for name, first in ((2, False), ("plain", True)):
        runner.layers[2].register_forward_hook(lambda m, a, o, name=name: seen.update(
            {(name, *tok): (o[0] + o[1])[t] for t, tok in enumerate(runner.tokens)}), prepend=first)
    runner.layers[1].register_forward_hook(lambda m, a, o: seen.update(
        {(1, *tok): (o[0] + o[1])[t] for t, tok in enumerate(runner.tokens)}))
    # a is preempted after the third forward and recomputed (positions 0-6 again; V2 sends it as new again)
    forwards = [[(f"r-{r}", s, n) for r, s, n in f] for f in FORWARDS[:3] + [[("a", 0, 7)]] + FORWARDS[3:]]
    for step, forward in enumerate(forwards):
        new = [SimpleNamespace(req_id=r, prompt_len=lengths[r][0], sampling_params=SimpleNamespace(
            extra_args=steering_extra_args(settings.get(r), key=r[2:]))) for r, s, _ in forward if s == 0]
        runner.execute_model(SimpleNamespace(scheduled_new_reqs=new, schedule=forward,
                                             finished_req_ids={"r-c"} if step == 5 else set()))
    steering.admit(SimpleNamespace(scheduled_new_reqs=[], finished_req_ids={"r-a"}))  # a finished, b running
    assert set(steering.done) == {"a"} and set(steering.requests) == {"r-b"}
    counts = steering.counts(["a", "b", "c"])
    assert counts["c"] is None and steering_extra_args(None, "c") == {PAYLOAD: None}
    for r, s in settings.items():
        after1 = torch.stack([seen[(1, r, p)] for p in range(lengths[r][1])])  # block 1's stream is never edited
        vector = gated_vector(hook, after1[:lengths[r][0]], s)
        unsteered = torch.stack([seen[("plain", r, p)] for p in range(lengths[r][1])])  # as the edit saw it
        torch.testing.assert_close(unsteered, after1 + torch.tanh(after1 @ runner.layers[2].w))
        want, want_counts = hook_alone(hook, unsteered, lengths[r][0], vector)
        got = torch.stack([seen[(2, r, p)] for p in range(lengths[r][1])])
        torch.testing.assert_close(got, want, rtol=FP32_TOL, atol=FP32_TOL)
        assert torch.equal(got[:lengths[r][0] - 1], unsteered[:lengths[r][0] - 1])
        assert counts[r[2:]] == {"enabled": True, **vector.describe(), **want_counts}
        assert want_counts["edited_tokens"] > 0
