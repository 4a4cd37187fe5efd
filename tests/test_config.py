import pytest

from sparserm.config import Config, ConfigError, DataSource, load_config, to_dict

PAPER_CONFIGS = ["gemma-2-2b-it", "gemma-2-9b-it", "llama-3.1-8b-instruct", "gemma-3-270m-it"]
CONFIGS = ["quickstart", *PAPER_CONFIGS]


def test_defaults_validate_and_round_trip():
    cfg = load_config()
    assert cfg == Config().validate()
    assert cfg.model.layers == (15,)
    assert isinstance(cfg.data.sources[0], DataSource)
    assert to_dict(cfg)["reward"]["top_k"] == 128


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  layer: 9\n  extra_layers: [3, 6]\nreward:\n  loss: bt\n")
    cfg = load_config(path, ["reward.top_k=16", "model.pooling=mean", "run.ray_address=null",
                             "data.sources=[{path: a.jsonl, max_pairs: 5}]"])
    assert cfg.model.layer == 9 and cfg.model.layers == (3, 6, 9)
    assert cfg.reward.loss == "bt" and cfg.reward.top_k == 16 and cfg.model.pooling == "mean"
    assert cfg.data.sources == (DataSource(path="a.jsonl", max_pairs=5),)
    assert cfg.features.batch_size == Config().features.batch_size  # untouched defaults stay


def test_a_string_override_is_taken_as_typed_and_a_number_with_a_leading_zero_is_refused(tmp_path):
    # YAML read "run #2" as "run" and a comment, and 010 as octal 8
    cfg = load_config(None, ["align.rm_dir=runs/run #2/rm", "model.name=a: b", "align.generate.judge_model=#5"])
    assert (cfg.align.rm_dir, cfg.model.name, cfg.align.generate.judge_model) == ("runs/run #2/rm", "a: b", "#5")
    assert load_config(None, ["align.rm_dir=null"]).align.rm_dir is None  # a field that may be unset
    assert load_config(None, ["align.rm_dir=NULL"]).align.rm_dir is None
    # text YAML cannot read at all, and spaces around it (from a shell line)
    assert load_config(None, ["model.name=@x"]).model.name == "@x"
    assert load_config(None, ["model.name= gpt2 "]).model.name == "gpt2"
    with pytest.raises(ConfigError, match="override model.layer: cannot parse value '@3'"):
        load_config(None, ["model.layer=@3"])
    assert load_config(None, ["model.name='0.1 #x'"]).model.name == "0.1 #x"  # YAML's quotes: their string
    for override in ("model.layer=010", "reward.lr=1:30"):
        with pytest.raises(ConfigError, match=f"{override.split('=')[0]}='.*' \\(str\\) is invalid"):
            load_config(None, [override])
    (tmp_path / "c.yaml").write_text("model: {layer: 010}\n")
    with pytest.raises(ConfigError, match="model.layer='010'"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("override, needle", [
    ("reward.topk=3", "reward.topk"),
    ("nosuch.key=1", "nosuch.key"),
    ("model.layer=abc", "model.layer"),
    ("reward.lr=true", "reward.lr"),
    ("model.pooling=max", "model.pooling"),
    ("model.layer.x=1", "model.layer.x"),
    ("reward.loss", "reward.loss"),
    # a step, a forward and a worker group of no pairs (an epoch's order divided by zero)
    ("align.train.batch_size=0", "align.train.batch_size"), ("align.train.micro_batch_size=0", "micro_batch_size"),
    ("align.train.num_workers=0", "align.train.num_workers"), ("align.train.batch_size=-4", "batch_size"),
    ("align.generate.batch_size=0", "align.generate.batch_size"), ("reward.epochs=0", "reward.epochs"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sae:\n  widht: 100\n")
    with pytest.raises(ConfigError, match="sae.widht"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load(name):
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml")
    if name != "quickstart":
        assert cfg.sae.source == "registry" and cfg.sae.release and cfg.sae.sae_id


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_name_a_registry_sae_of_their_model_and_layer(name):
    """The release and id are in sae-lens' registry (no download), for this model family, at ``model.layer``."""
    import re

    from sparserm.sae.autoencoder import registry_entry
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml")
    entry = registry_entry(cfg.sae.release, cfg.sae.sae_id)
    assert entry.model.split("/")[-1].lower().removesuffix("-it").removesuffix("-instruct") in cfg.model.name.lower()
    layer = re.search(r"layer_(\d+)|^l(\d+)r", cfg.sae.sae_id)
    assert int(layer.group(1) or layer.group(2)) == cfg.model.layer


# ---------------------------------------------------------------- pydantic-backed building: messages and types


@pytest.mark.parametrize("override, message", [
    # unknown keys: the full dotted key, and the keys that do exist there
    ("reward.topk=3", r"unknown config key reward\.topk \(known: .*\btop_k\b"),
    ("align.generate.vllm.num_gpu=1", r"unknown config key align\.generate\.vllm\.num_gpu \(known: .*num_gpus"),
    ("data.sources=[{path: a.jsonl, bogus: 1}]", r"unknown config key data\.sources\[0\]\.bogus \(known: format, "
                                                 r"max_pairs, max_per_prompt, path, split\)"),
    ("serve.autoscaling={min_replicas: 1, most: 3}", r"serve\.autoscaling\.most \(known: max_replicas, min_replicas"),
    ("model.layer.x=1", r"unknown config key model\.layer\.x: model\.layer is not a config section"),
    # the renamed resource keys: the old names are unknown, the message lists the new ones
    ("features.num_gpus_per_actor=1", r"features\.num_gpus_per_actor \(known: .*num_actors, num_cpus, num_gpus"),
    ("reward.use_gpu=true", r"reward\.use_gpu \(known: .*num_cpus, num_gpus, num_workers"),
    ("serve.num_cpus_per_replica=1", r"serve\.num_cpus_per_replica \(known: .*num_cpus, num_gpus"),
    # wrong types: the dotted key, the value and its type; strict (a bool is no int, a string no number)
    ("model.layer=abc", r"model\.layer='abc' \(str\) is invalid: Input should be a valid integer"),
    ("reward.top_k=true", r"reward\.top_k=True \(bool\) is invalid"),
    ("reward.top_k=8.0", r"reward\.top_k=8\.0 \(float\) is invalid"),
    ("reward.lr='0.1'", r"reward\.lr='0\.1' \(str\) is invalid: Input should be a valid number"),
    ("reward.lr=true", r"reward\.lr=True \(bool\) is invalid"),
    ("model.layer=[3]", r"model\.layer=\[3\] \(list\) is invalid: Input should be a valid integer"),
    ("align.generate.vllm.num_gpus=x", r"align\.generate\.vllm\.num_gpus='x' \(str\) is invalid"),
    ("model.extra_layers=[1, x]", r"model\.extra_layers\[1\]='x'"),
    ("model.extra_layers=3", r"model\.extra_layers=3 \(int\) is invalid"),
    ("data.sources=[{max_pairs: 5}]", r"data\.sources\[0\]\.path is invalid: Field required"),
    ("serve.autoscaling=3", r"serve\.autoscaling=3 \(int\) is invalid"),
    # ranges and choices from the annotations
    ("model.pooling=max", r"model\.pooling='max' \(str\) is invalid: Input should be 'mean_response', 'last' or "
                          r"'mean'"),
    ("features.num_gpus=-1", r"features\.num_gpus=-1 \(int\) is invalid: Input should be greater than or equal to 0"),
    ("model.extra_layers=[1, -2]", r"model\.extra_layers\[1\]=-2"),
    ("data.eval_fraction=1", r"data\.eval_fraction=1 \(int\) is invalid: Input should be less than 1"),
    ("reward.num_gpus=-0.5", r"reward\.num_gpus=-0\.5"),
    ("serve.num_cpus=-1", r"serve\.num_cpus=-1"),
    # across fields: 2 x top_k disjoint latents of the SAE trained here
    ("reward.top_k=2049", r"reward\.top_k=2049 is invalid: expected <= 2048: 2 x top_k disjoint latents of "
                          r"sae\.width=4096"),
    # the preference objective: a registered name, a positive beta (or unset: the objective's own)
    ("align.loss.name=ipo", r"align\.loss\.name='ipo' is invalid: expected dpo\|fpo\|simpo\|tdpo2"),
    ("align.loss.beta=0", r"align\.loss\.beta=0\.0 is invalid: expected > 0, or unset"),
    ("align.train.warmup_steps=-1", r"align\.train\.warmup_steps=-1 \(int\) is invalid"),
])
def test_error_messages_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_all_errors_of_a_file_are_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  layer: true\nsae:\n  widht: 100\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "model.layer=True (bool)" in str(info.value) and "unknown config key sae.widht (known: " in str(info.value)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(path)
    path.write_text("model: {layer: [\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(path)


def test_types_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    # YAML 1.1 reads 5e-3 (no dot) and 1.5e3 (no exponent sign) as strings; the loader reads floats
    path.write_text("reward:\n  lr: 5e-3\n  weight_decay: 1.5e3\n  sweep_k: [8, 16]\nfeatures:\n  num_cpus: 1\n"
                    "align:\n  policy: &res {num_cpus: 1, num_gpus: 0}\n  scorer: *res\n")
    cfg = load_config(path, ["align.generate.vllm.num_gpus=0.4", "serve.autoscaling.max_replicas=3",
                             "align.scorer.num_gpus=0.2", "run.ray_address=null", "model.extra_layers=[3, 6]"])
    assert cfg.reward.lr == 5e-3 and cfg.reward.weight_decay == 1500.0
    assert cfg.reward.sweep_k == (8, 16) and cfg.model.extra_layers == (3, 6)  # tuples from lists
    assert cfg.features.num_cpus == 1.0 and isinstance(cfg.features.num_cpus, float)  # an int is a float
    assert cfg.align.generate.vllm.num_gpus == 0.4 and cfg.align.generate.vllm.num_engines == 1
    assert cfg.serve.autoscaling.max_replicas == 3 and cfg.serve.autoscaling.min_replicas == 1  # X | None: built
    assert cfg.align.scorer.num_gpus == 0.2 and cfg.align.policy.num_gpus == 0.0  # an alias is not shared
    assert cfg.run.ray_address is None
    assert load_config(None, ["reward.lr=5e-3"]).reward.lr == 5e-3


def test_build_reads_to_dict_output_back():
    from sparserm.config import AlignConfig, ModelConfig, ServeConfig, build, replace

    cfg = load_config(None, ["model.extra_layers=[3]", "serve.autoscaling={max_replicas: 2}"])
    assert build(Config, to_dict(cfg)) == cfg
    assert build(ModelConfig, to_dict(cfg.model)) == cfg.model and build(AlignConfig, to_dict(cfg.align)) == cfg.align
    assert build(ModelConfig, {"layer": 3}) == ModelConfig(layer=3)  # absent keys: defaults
    assert build(Config, {"serve": ServeConfig(port=9)}).serve.port == 9  # dataclass objects are values too
    with pytest.raises(ConfigError, match=r"unknown config key model\.layr \(known: chat_template, "):
        build(ModelConfig, {"layr": 3}, "model")
    with pytest.raises(ConfigError, match=r"^layer='3' \(str\)"):
        build(ModelConfig, {"layer": "3"})
    assert replace(cfg.model, layer=4).layer == 4
    with pytest.raises(ConfigError, match=r"model\.pooling='max'"):  # validate() checks a Config made in code too
        Config(model=ModelConfig(pooling="max")).validate()
