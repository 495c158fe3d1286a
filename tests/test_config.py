"""Config loading: composition by base files, dotted overrides, one-line errors."""

import pytest

from train.config import ConfigError, load_config, parse_override

from helpers import REPO


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_default_config_and_name():
    cfg = load_config(str(REPO / "configs" / "default.yaml"))
    assert cfg.name == "default" and cfg.run_dir == "runs/default"
    assert cfg.model.num_layers == 4  # from base: tiny.yaml
    assert cfg.mesh.data == -1


def test_base_chain_and_list_compose(tmp_path):
    write(tmp_path, "size.yaml", "model: {num_layers: 6, d_model: 96, num_heads: 3}\n")
    write(tmp_path, "mesh.yaml", "mesh: {data: 2, fsdp: -1}\nsharding: {rules: dp}\n")
    path = write(tmp_path, "run.yaml", "base: [size.yaml, mesh.yaml]\nmodel: {num_layers: 8}\n")
    cfg = load_config(path)
    assert (cfg.model.num_layers, cfg.model.d_model, cfg.model.num_heads) == (8, 96, 3)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.sharding.rules) == (2, -1, "dp")
    assert cfg.name == "run"
    # base files are also looked up in the repository's configs/
    path = write(tmp_path, "mine.yaml", "base: gpt2-124m.yaml\nmodel: {num_layers: 2}\n")
    cfg = load_config(path)
    assert cfg.model.d_model == 768 and cfg.model.num_layers == 2


def test_overrides_are_typed_and_dotted():
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"),
                      ["mesh.data=2", "optimizer.lr=1e-3", "model.tie_embeddings=false",
                       "output_dir=/tmp/x", "sharding.rules={preset: fsdp, mlp: model}"])
    assert cfg.mesh.data == 2 and cfg.optimizer.lr == 1e-3
    assert cfg.model.tie_embeddings is False and cfg.run_dir == "/tmp/x"
    assert cfg.sharding.rules == {"preset": "fsdp", "mlp": "model"}
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize("override, message", [
    ("train.stpes=10", "unknown config key 'train.stpes'; did you mean 'train.steps'?"),
    ("mesh.dta=2", "unknown config key 'mesh.dta'; did you mean 'mesh.data'?"),
    ("train.steps=ten", "train.steps='ten' is not allowed: expected an integer"),
    ("model.style=bert", "model.style='bert' is not allowed: expected one of 'gpt2', 'llama'"),
    ("model.remat=some", "model.remat='some' is not allowed: expected one of 'none', 'full', "
                         "'save_dots', 'save_ring'"),
    ("optimizer.lr=fast", "optimizer.lr='fast' is not allowed: expected a number"),
    ("optimizer.lr=-1", "optimizer.lr=-1.0 is negative: the run would climb the loss; give "
                        "a positive peak learning rate"),
    ("train.batch_size=10", "train.batch_size=10 does not divide by train.microbatches=4"),
    ("train.seq_len=4096", "train.seq_len=4096 exceeds model.max_seq_len=256"),
    ("model.num_heads=3",
     "model.d_model=128 does not divide by model.num_heads=3; set model.head_dim"),
    ("train", "override 'train' must look like key=value (e.g. train.steps=100)"),
    ("model=3", "model must be a mapping of keys, got 3"),
])
def test_bad_values_name_the_key(override, message):
    extra = ["train.microbatches=4"] if "batch_size" in override else []
    with pytest.raises(ConfigError) as err:
        load_config(str(REPO / "configs" / "tiny.yaml"), extra + [override])
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_a_mistyped_key_is_suggested_by_section_then_by_key_and_names_its_file(tmp_path):
    cases = {"trian.steps=3": "train.steps", "modle.d_model=64": "model.d_model",
             "seed=3": "train.seed", "train.stpes=3": "train.steps"}
    for override, meant in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(str(REPO / "configs" / "tiny.yaml"), [override])
        assert str(err.value).endswith(f"; did you mean {meant!r}?"), str(err.value)
    path = write(tmp_path, "run.yaml", "base: tiny.yaml\ntrian:\n  steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"unknown config key 'trian.steps' in {path!r}; did you mean "
                              "'train.steps'?")
    base = write(tmp_path, "base.yaml", "model: {num_layer: 2}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError, match=f"'model.num_layer' in {base!r}; did you mean "
                                          "'model.num_layers'"):
        load_config(child)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml' not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = write(tmp_path, "bad.yaml", "model: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=f"config file '{tmp_path}' is a directory"):
        load_config(str(tmp_path))
    missing_base = write(tmp_path, "child.yaml", "base: missing.yaml\n")
    with pytest.raises(ConfigError, match="base config 'missing.yaml'.* not found"):
        load_config(missing_base)
    loop = write(tmp_path, "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(loop)
