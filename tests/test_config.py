"""Typed recipes: YAML loading, `--set` overrides and their types, and errors that name the offending key."""
from __future__ import annotations

import pytest
import yaml

from squad_ds.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    Recipe,
    TrainConfig,
    apply_overrides,
    dump_recipe,
    list_recipes,
    load_recipe,
    parse_override,
    recipe_from_dict,
    recipe_path,
)


def write_recipe(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- loading

def test_default_is_the_embedded_demo():
    assert load_recipe() == load_recipe("demo") == load_recipe(str(recipe_path("demo")))
    demo = load_recipe()
    assert demo.model.name_or_path == "all-MiniLM-L6-v2"
    assert (demo.train.micro_batch_size, demo.train.lr, demo.train.warmup_proportion) == (16, 3e-4, 0.1)


def test_yaml_file_by_path(tmp_path):
    path = write_recipe(tmp_path, """
model: {name_or_path: some/model}
data: {max_seq_length: 128, doc_stride: 64, max_query_length: 32, version: "2.0"}
eval: {null_score_diff_threshold: -1.5}
train: {epochs: 3, lr: 2.0e-5, micro_batch_size: 8, activation_checkpointing: true}
deepspeed_config: zero3_bf16
expected: {f1: 80, exact_match: 70.5}
""")
    r = load_recipe(path)
    assert r.model.name_or_path == "some/model"
    assert (r.data.max_seq_length, r.data.doc_stride, r.data.max_query_length, r.data.version) == (128, 64, 32, "2.0")
    assert r.eval.null_score_diff_threshold == -1.5
    assert r.train.epochs == 3.0 and isinstance(r.train.epochs, float)  # int accepted where a float is expected
    assert r.train.lr == 2e-5 and r.train.micro_batch_size == 8 and r.train.activation_checkpointing is True
    assert r.deepspeed_config == "zero3_bf16"
    assert r.expected == {"f1": 80.0, "exact_match": 70.5} and isinstance(r.expected["f1"], float)
    # Unset values keep the dataclass defaults.
    assert r.eval == EvalConfig(null_score_diff_threshold=-1.5) and r.train.max_steps is None


def test_empty_file_and_empty_sections_are_the_defaults(tmp_path):
    assert load_recipe(write_recipe(tmp_path, "")) == Recipe()
    assert load_recipe(write_recipe(tmp_path, "train:\nmodel: null\n", "s.yml")) == Recipe()


def test_unknown_named_recipe_lists_the_named_ones():
    with pytest.raises(ConfigError, match="no_such_recipe") as e:
        load_recipe("no_such_recipe")
    assert "demo" in str(e.value) and "tiny" in str(e.value)
    assert set(list_recipes()) >= {"demo", "tiny"}


def test_missing_yaml_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_invalid_yaml_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(write_recipe(tmp_path, "train: {lr: [1,\n"))


def test_a_directory_named_like_a_recipe_does_not_shadow_it(tmp_path, monkeypatch):
    """BUG (config.recipe_path): a relative name that exists as anything (here a directory, e.g. an output folder
    called `demo`) is taken as a path, so `load_recipe("demo")` fails with 'no such file' from that directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert load_recipe("demo") == load_recipe(str(recipe_path("demo").resolve()))


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_recipe(write_recipe(tmp_path, "train: 5\n"))
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_recipe("demo", ["train=5"])


def test_recipe_file_must_be_a_mapping(tmp_path):
    """BUG (config.load_recipe / apply_overrides): a YAML file whose top level is a list crashes with
    AttributeError ('list' object has no attribute 'items') in apply_overrides, before recipe_from_dict's own
    "a recipe must be a mapping of sections" check can run."""
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(write_recipe(tmp_path, "- a\n- b\n"))


def test_dump_round_trips():
    r = load_recipe("demo", ["train.max_steps=3", "expected.f1=1.5"])
    assert recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r


# ---------------------------------------------------------------- overrides and their types

@pytest.mark.parametrize("text, key, value", [
    ("train.lr=3.0e-5", "lr", 3e-5),
    ("train.lr=0.0001", "lr", 1e-4),
    ("train.lr=1", "lr", 1.0),  # an int where a float is expected
    ("train.max_steps=7", "max_steps", 7),
    ("train.max_steps=null", "max_steps", None),
    ("train.max_steps=", "max_steps", None),  # empty value = null
    ("train.activation_checkpointing=true", "activation_checkpointing", True),
    ("train.activation_checkpointing=false", "activation_checkpointing", False),
    ("train.warmup_proportion=0", "warmup_proportion", 0.0),
    ("train.weight_decay=0.0", "weight_decay", 0.0),
    ("train.optimizer=deepspeed", "optimizer", "deepspeed"),
])
def test_override_types(text, key, value):
    r = load_recipe("demo", [text])
    got = getattr(r.train, key)
    assert got == value and type(got) is type(value)


def test_override_float_in_e_notation():
    """`--set train.lr=3e-5`, the spelling every paper and script uses. PyYAML follows YAML 1.1, where a float needs
    a dot ("3.0e-5"), so plain yaml.safe_load reads "3e-5" as a string."""
    assert load_recipe("demo", ["train.lr=3e-5"]).train.lr == 3e-5
    assert load_recipe("demo", ["train.lr=5E-5"]).train.lr == 5e-5
    assert load_recipe("demo", ["train.max_steps=12"]).train.max_steps == 12


def test_quoted_override_stays_a_string():
    """BUG (config.parse_override, from the e-notation fix): every string that float()/int() accepts is turned into
    a number after YAML parsing, quoted or not, so `--set data.version='2.0'` (and `data.version=2.0`) both fail
    with "data.version: expected str | None, got 2.0": data.version can no longer be set from the command line.
    Quoting is YAML's way to say "a string"; a number-looking string must survive it."""
    assert load_recipe("demo", ["data.version='2.0'"]).data.version == "2.0"
    assert load_recipe("demo", ['data.version="1.1"']).data.version == "1.1"
    assert load_recipe("demo", ["model.name_or_path='1e5'"]).model.name_or_path == "1e5"


def test_overrides_on_other_sections_and_top_level():
    r = load_recipe("demo", ["model.name_or_path=/tmp/m", "data.max_train_examples=10",
                             "eval.null_score_diff_threshold=-2", "expected.f1=88.5", "description=x y",
                             "deepspeed_config=zero3_bf16", "output.export=false"])
    assert r.model.name_or_path == "/tmp/m" and r.data.max_train_examples == 10
    assert r.eval.null_score_diff_threshold == -2.0 and r.expected == {"f1": 88.5}
    assert r.description == "x y" and r.deepspeed_config == "zero3_bf16" and r.output.export is False


def test_later_overrides_win_and_the_file_is_untouched():
    raw = {"train": {"lr": 1e-4}}
    out = apply_overrides(raw, ["train.lr=1.0e-5", "train.lr=2.0e-5"])
    assert out == {"train": {"lr": 2e-5}} and raw == {"train": {"lr": 1e-4}}
    assert load_recipe("demo").train.lr == 3e-4


@pytest.mark.parametrize("text", ["train.lr", "train.lr.x=1"])
def test_malformed_override_is_an_error(text):
    with pytest.raises(ConfigError, match="--set"):
        load_recipe("demo", [text])
    with pytest.raises(ConfigError, match="unknown key ''"):
        load_recipe("demo", ["=3"])


def test_parse_override_uses_yaml_values():
    assert parse_override("train.max_steps=12") == (["train", "max_steps"], 12)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("model.name_or_path=a=b") == (["model", "name_or_path"], "a=b")


# ---------------------------------------------------------------- unknown keys and wrong types name the key

def test_unknown_section_names_it():
    with pytest.raises(ConfigError, match="'trian'") as e:
        load_recipe("demo", ["trian.lr=1.0e-5"])
    assert "train" in str(e.value)  # the known sections are listed


def test_unknown_key_names_it_and_lists_the_known(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rate") as e:
        load_recipe("demo", ["train.learning_rate=1.0e-5"])
    assert "lr" in str(e.value)
    path = write_recipe(tmp_path, "data:\n  max_seq_len: 128\n")
    with pytest.raises(ConfigError, match=r"data\.max_seq_len") as e:
        load_recipe(path)
    assert path in str(e.value)


@pytest.mark.parametrize("text, key", [
    ("train.max_steps=1.5", "train.max_steps"),  # float for int
    ("train.max_steps=true", "train.max_steps"),  # bool is not an int
    ("train.micro_batch_size=four", "train.micro_batch_size"),
    ("train.lr=fast", "train.lr"),
    ("train.lr=true", "train.lr"),  # bool is not a number
    ("train.activation_checkpointing=1", "train.activation_checkpointing"),  # int is not a bool
    ("data.version=2.0", "data.version"),  # a YAML float, not the string "2.0"
    ("model.name_or_path=5", "model.name_or_path"),
    ("expected.f1=high", "expected.f1"),
    ("description=[1]", "description"),
])
def test_wrong_type_names_the_key(text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe("demo", [text])


# ---------------------------------------------------------------- validation on construction

@pytest.mark.parametrize("text, key", [
    ("data.version='3.0'", "data.version"),
    ("data.max_seq_length=0", "data.max_seq_length"),
    ("data.doc_stride=256", "data.doc_stride"),  # demo max_seq_length is 256: stride must be smaller
    ("data.doc_stride=0", "data.doc_stride"),
    ("data.max_query_length=300", "data.max_query_length"),
    ("data.max_train_examples=0", "data.max_train_examples"),
    ("eval.n_best_size=0", "eval.n_best_size"),
    ("eval.batch_size=-1", "eval.batch_size"),
    ("train.epochs=0", "train.epochs"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.gradient_accumulation_steps=-2", "train.gradient_accumulation_steps"),
    ("train.lr=0", "train.lr"),
    ("train.warmup_proportion=1", "train.warmup_proportion"),
    ("train.warmup_proportion=-0.1", "train.warmup_proportion"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("train.keep_last=0", "train.keep_last"),
    ("train.eval_steps=-1", "train.eval_steps"),
    ("model.attn_implementation=flash", "model.attn_implementation"),
])
def test_invalid_values_name_the_key(text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe("demo", [text])


def test_negative_weight_decay_is_refused():
    """BUG (config.TrainConfig): lr and warmup_proportion are range-checked but weight_decay is not, so a sign slip
    (-0.01) trains with negative decay (weights pushed away from zero) without a word."""
    with pytest.raises(ConfigError, match=r"train\.weight_decay"):
        load_recipe("demo", ["train.weight_decay=-0.01"])


def test_dataclasses_validate_on_direct_construction():
    with pytest.raises(ConfigError, match="data.doc_stride"):
        DataConfig(max_seq_length=64, doc_stride=64)
    with pytest.raises(ConfigError, match="train.epochs"):
        TrainConfig(epochs=-1)
