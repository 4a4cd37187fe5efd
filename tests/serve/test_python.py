"""Python access: the DeploymentHandle client, the Ray Data stage, TRL's GRPOTrainer, retries, CLI and config."""
from __future__ import annotations

import pytest

from tests.serve.test_http import PROMPTS, RESPONSES


def test_handle_client(service, rm):
    from sparserm.serve import RewardClient, ServeRequestError

    client = RewardClient(service["app"])
    assert client.score(PROMPTS, RESPONSES) == pytest.approx(rm.score(PROMPTS, RESPONSES), abs=1e-5)
    # more items than max_items_per_request (8) are sent in chunks
    prompts, responses = PROMPTS * 4, RESPONSES * 4
    assert client.score(prompts, responses) == pytest.approx(rm.score(prompts, responses), abs=1e-5)
    chosen, rejected = rm.score_pairs(PROMPTS, RESPONSES, RESPONSES[::-1])
    margins = client.compare(PROMPTS, RESPONSES, RESPONSES[::-1])
    assert margins == pytest.approx([c - r for c, r in zip(chosen, rejected)], abs=1e-5)
    assert client.get_reward(["plain"]) == pytest.approx(rm.score([""], ["plain"]), abs=1e-5)
    with pytest.raises(ServeRequestError) as err:
        client.score_items([{"prompt": "p"}])
    assert err.value.status == 422 and err.value.field == "items.0.response"


def test_http_client_and_auth(service, rm):
    from sparserm.serve import HTTPRewardClient, ServeRequestError

    client = HTTPRewardClient(service["auth_url"], token=service["token"], retries=0)
    assert client.score(PROMPTS, RESPONSES) == pytest.approx(rm.score(PROMPTS, RESPONSES), abs=1e-5)
    with pytest.raises(ServeRequestError) as err:
        HTTPRewardClient(service["auth_url"], retries=0).score(PROMPTS, RESPONSES)
    assert err.value.status == 401


def test_ray_data_stage(service, rm):
    import ray

    from sparserm.serve import score_dataset

    rows = [{"prompt": p, "response": r, "id": i} for i, (p, r) in enumerate(zip(PROMPTS * 3, RESPONSES * 3))]
    out = score_dataset(ray.data.from_items(rows), app_name=service["app"], batch_size=4).take_all()
    out = sorted(out, key=lambda row: row["id"])
    expected = rm.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert [row["score"] for row in out] == pytest.approx(expected, abs=1e-5)


def test_trl_grpo_reward_func(service, rm, tiny_model_dir, tmp_path):
    """One real GRPOTrainer step: TRL itself calls the reward function (conversational prompts)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from sparserm.serve import SparseRMReward

    class Recording(SparseRMReward):
        calls: list = []

        def __call__(self, prompts, completions, **kwargs):
            scores = super().__call__(prompts, completions, **kwargs)
            self.calls.append((prompts, completions, sorted(kwargs), scores))
            return scores

    reward = Recording(service["url"])
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:2]]})
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=6, max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                      logging_steps=1, disable_tqdm=True)
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.train()
    assert reward.calls
    prompts, completions, kwargs, scores = reward.calls[0]
    assert "completion_ids" in kwargs and isinstance(prompts[0], list) and isinstance(completions[0], list)
    texts = [c[0]["content"] for c in completions]
    assert scores == pytest.approx(rm.score([p[-1]["content"] for p in prompts], texts), abs=1e-5)
    assert "rewards/sparserm/mean" in str(trainer.state.log_history)


def test_trl_reward_reads_a_tool_call_turn_as_no_text(service):
    # an assistant message that only calls tools has content None: it was scored as the text "None"
    from sparserm.serve import HTTPRewardClient, SparseRMReward

    reward = SparseRMReward(service["url"])
    prompts = [[{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": None},
                {"role": "user", "content": [{"type": "text", "text": "and?"}, {"type": "image"}]}]]
    completions = [[{"role": "assistant", "content": None}, {"role": "assistant", "content": RESPONSES[0]}]]

    def served(turn: str) -> list[float]:  # the same conversation with the tool-call turn as given text
        return HTTPRewardClient(service["url"]).score([[{"role": "user", "content": PROMPTS[0]},
                                                        {"role": "assistant", "content": turn},
                                                        {"role": "user", "content": "and?"}]], [RESPONSES[0]])

    got = reward(prompts=prompts, completions=completions)
    assert got == pytest.approx(served(""), abs=1e-6) and got != pytest.approx(served("None"), abs=1e-6)


def test_client_retries_across_replica_restart(service, rm):
    """Kill the replica: the controller replaces it and the client's retries get the same scores."""
    import ray

    from sparserm.serve import RewardClient

    client = RewardClient(service["app"], retries=8, backoff_s=0.5)
    before = client.score(PROMPTS, RESPONSES)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "SERVE_REPLICA" in a["name"] and "sparserm#SparseRM" in a["name"]
                and "sparserm-auth" not in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    assert client.score(PROMPTS, RESPONSES) == pytest.approx(before, abs=1e-5)


def test_cli_and_config(tmp_path):
    from sparserm.cli import build_parser
    from sparserm.config import ConfigError
    from sparserm.serve.cli import cmd_serve_rm
    from sparserm.serve.config import ServeConfig, load_serve_config
    from sparserm.serve.options import deployment_options, validate_serve

    args = build_parser().parse_args(["serve", "rm", "RM", "serve.overlong=truncate", "--port", "9001", "--replicas", "2"])
    assert args.func is cmd_serve_rm
    assert (args.rm_dir, args.port, args.replicas, args.overrides, args.host) == ("RM", 9001, 2, ["serve.overlong=truncate"], None)
    (tmp_path / "c.yaml").write_text("model: {layer: 3}\nserve:\n  autoscaling: {min_replicas: 1, max_replicas: 3}\n")
    cfg = load_serve_config(tmp_path / "c.yaml", ["serve.max_batch_size=8"])
    assert cfg.host == "127.0.0.1" and cfg.max_batch_size == 8
    opts = deployment_options(cfg)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3} and "num_replicas" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}  # per replica
    # another section's key is refused by name (steer.alpha was taken for serve.steer.alpha, "not a section")
    for other in ("steer.alpha=0.5", "tracking.tensorboard=false", "model.layer=3"):
        with pytest.raises(ConfigError, match=f"override {other}: a service takes serve.\\* settings"):
            load_serve_config(None, [other])
    opts = deployment_options(load_serve_config(None, ["num_cpus=2", "serve.num_gpus=0.5", "replicas=3"]))
    assert opts["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5} and opts["num_replicas"] == 3
    with pytest.raises(ConfigError, match=r"serve\.num_gpus=-1 is invalid"):  # a ServeConfig made in code
        validate_serve(ServeConfig(num_gpus=-1))
    for bad in (["serve.nope=1"], ["serve.overlong=cut"], ["serve.port=x"], ["serve.num_cpus_per_replica=1"]):
        with pytest.raises(ConfigError):
            load_serve_config(None, bad)


def test_batch_isolates_a_failing_item(rm_dir, rm, monkeypatch):
    """Items of concurrent requests share a model pass; one that fails it fails only its own request.
    (The replica's class runs here without Serve; ``@serve.batch`` only asks the replica context for a warning.)"""
    import asyncio
    from types import SimpleNamespace

    from ray import serve

    from sparserm.serve.app import RewardModelServer

    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    from sparserm.serve.config import ServeConfig

    server = RewardModelServer(str(rm_dir), ServeConfig(max_batch_size=8, batch_wait_timeout_s=0.2))
    poison = server.scorer.encode("p", ["POISON"]).suffixes[0]
    score_groups = server.scorer.score_groups

    sizes = []

    def failing(groups):
        sizes.append(len(groups))
        if any(g.suffixes[0] == poison for g in groups):
            raise RuntimeError("model pass failed")
        return score_groups(groups)

    server.scorer.score_groups = failing

    async def both():
        return await asyncio.gather(server.score([{"prompt": "p", "response": "ok"}]),
                                    server.score([{"prompt": "p", "response": "POISON"}]), return_exceptions=True)

    good, bad = asyncio.run(both())
    assert good["scores"] == pytest.approx(rm.score(["p"], ["ok"]), abs=1e-5)
    assert isinstance(bad, RuntimeError)
    assert sizes == [2, 1, 1]  # the shared pass failed; each entry was then scored alone


def test_token_aware_batch_sizing():
    """A batch closes at max_batch_size items or at max_batch_tokens tokens; no entry is larger than a batch."""
    from sparserm.model.text import TokenGroup
    from sparserm.serve.scoring import batch_chunks, batch_size_fn

    short, long = TokenGroup([1] * 5, [[2] * 5]), TokenGroup([1] * 30, [[2] * 30, [3] * 40])  # 10 and 100 tokens
    chunks = batch_chunks([short] * 6, max_batch_size=4, max_batch_tokens=200)
    assert [n for _, n, _ in chunks] == [4, 2] and [batch_size_fn([c]) for c in chunks] == [4, 2]
    chunks = batch_chunks([long, long, long, short], max_batch_size=4, max_batch_tokens=200)
    assert [n for _, n, _ in chunks] == [2, 2]  # two long groups fill the token budget
    assert all(batch_size_fn([c]) <= 4 for c in chunks) and batch_size_fn(chunks) > 4
    huge = TokenGroup([1] * 500, [[2] * 500])
    assert batch_size_fn(batch_chunks([huge], 4, 200)) == 4  # alone in its batch, never over the limit
    assert [n for _, n, _ in batch_chunks([long] * 5, 4, 0)] == [4, 1]  # token budget off: items only
