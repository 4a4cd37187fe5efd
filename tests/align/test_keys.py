"""Artifacts keyed by what produced them: differences named field by field, and the reward model that
`align` trains for itself reused only when its manifest matches the config."""
import pytest

from sparserm.config import load_config, replace
from sparserm.manifest import StaleArtifactError, check_key, folder_hash, key_diff, write_manifest


def test_key_diff_names_each_differing_field():
    a = {"sampling": {"temperature": 0.7, "top_p": 0.9}, "seed": 0, "policy": None}
    b = {"sampling": {"temperature": 0.3, "top_p": 0.9}, "seed": 0, "policy": "abc"}
    assert key_diff(a, b) == ["policy", "sampling.temperature"]
    check_key(a, dict(a), "x")  # same key: accepted
    with pytest.raises(StaleArtifactError, match=r"x was produced .*sampling\.temperature"):
        check_key(a, b, "x")
    with pytest.raises(StaleArtifactError, match="no key recorded"):
        check_key(None, a, "x")


def test_folder_hash_follows_content_not_place(tmp_path):
    for name in ("one", "two"):
        (tmp_path / name / "head").mkdir(parents=True)
        (tmp_path / name / "rm.json").write_text("{}")
        (tmp_path / name / "head" / "w.safetensors").write_bytes(b"123")
    assert folder_hash(tmp_path / "one") == folder_hash(tmp_path / "two")
    (tmp_path / "two" / "head" / "w.safetensors").write_bytes(b"124")
    assert folder_hash(tmp_path / "one") != folder_hash(tmp_path / "two")


def test_own_reward_model_is_reused_only_for_the_same_config(tmp_path, tiny_model_dir):
    from sparserm.align.rounds import own_reward_model
    from sparserm.testing import build_tiny_rm

    folder = tmp_path / "reward_model"
    build_tiny_rm(folder / "rm", model_dir=tiny_model_dir)
    cfg = load_config(None, [f"model.name={tiny_model_dir}"])
    with pytest.raises(StaleArtifactError, match="no key recorded"):  # an RM folder nobody can vouch for
        own_reward_model(cfg, folder)
    write_manifest(folder, cfg, "rm")
    assert own_reward_model(cfg, folder) == str(folder / "rm")
    with pytest.raises(StaleArtifactError, match="reward.top_k"):
        own_reward_model(load_config(None, [f"model.name={tiny_model_dir}", "reward.top_k=64"]), folder)


def test_dpo_key_follows_training_not_placement(tiny_model_dir):
    from sparserm.align.trainer import dpo_key

    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    base = load_config(None, [f"model.name={tiny_model_dir}"])
    key = dpo_key(base, pairs, None)
    for same in ("align.train.num_cpus=3", "align.train.num_gpus=0.5", "align.train.torch_threads=1",
                 "align.eval.hh_pairs=5", "model.layer=3", "model.pooling=last"):
        assert dpo_key(load_config(None, [f"model.name={tiny_model_dir}", same]), pairs, None) == key, same
    for other in ("align.train.lr=1e-2", "align.loss.beta=0.2", "align.reference=base", "align.train.num_workers=2",
                  "model.dtype=bfloat16", "align.generate.max_new_tokens=9"):
        cfg = load_config(None, [f"model.name={tiny_model_dir}", other,
                                 *(["align.train.batch_size=8"] if "workers" in other else [])])
        assert dpo_key(cfg, pairs, None) != key, other
    assert dpo_key(base, pairs + pairs, None) != key
    # the keys of runs made before objectives and warm-up existed still match: DPO's loss key is its name and
    # beta, and warmup_steps enters only when it is set
    assert key["loss"] == {"name": "dpo", "beta": 0.1} and "warmup_steps" not in key["train"]
    assert dpo_key(load_config(None, [f"model.name={tiny_model_dir}", "align.loss.simpo_gamma=2"]), pairs, None) == key
    assert dpo_key(load_config(None, [f"model.name={tiny_model_dir}", "align.train.warmup_steps=5"]), pairs,
                   None)["train"]["warmup_steps"] == 5
    simpo = load_config(None, [f"model.name={tiny_model_dir}", "align.loss.name=simpo"])
    assert dpo_key(simpo, pairs, None)["loss"] == {"name": "simpo", "beta": 2.0, "simpo_gamma": 0.5}
    assert dpo_key(replace(simpo, align=replace(simpo.align, loss=replace(simpo.align.loss, simpo_gamma=1.0))),
                   pairs, None) != dpo_key(simpo, pairs, None)


def test_tensor_parallel_ranks_take_whole_gpus():
    from sparserm.config import ConfigError

    with pytest.raises(ConfigError, match="tensor_parallel_size > 1"):
        load_config(None, ["align.generate.vllm.tensor_parallel_size=2", "align.generate.vllm.num_gpus=0.5"])
    assert load_config(None, ["align.generate.vllm.tensor_parallel_size=2"]).align.generate.vllm.num_gpus == 1
