"""Every shipped recipe loads, type-checks, and its batch layout resolves against its DeepSpeed config for the GPU
count it documents; published rows carry their published hyperparameters and scores.

The GPU count a recipe assumes is its typed `published_world_size` key (absent for recipes that pin no global
batch); the test reads that key, never the description.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import pytest
import yaml
from test_ds_configs import build_scheduler, deepspeed_parse, is_cpu_config

from squad_ds.config import ConfigError, dump_recipe, list_recipes, load_recipe, recipe_from_dict, recipe_path
from squad_ds.data.files import resolve_data_path
from squad_ds.training.ds_config import default_ds_config, load_ds_config, resolve_ds_config

RECIPES = list_recipes()
# Train features of SQuAD v1.1 at 384/128 with bert-base-uncased: a realistic size for the step arithmetic.
SQUAD11_TRAIN_FEATURES = 88641
UNPUBLISHED = {"demo", "tiny", "minilm_squad1_full", "minilm_squad1_full_cpu"}
LARGE = "_large_batch"

# The published rows, transcribed from the sources cited in each recipe and in docs/RECIPES.md: the transformers
# examples README (examples/question-answering/README.md, now examples/legacy/question-answering/README.md) for the
# BERT and XLNet rows; the RoBERTa paper (arXiv:1907.11692, Table 6 and Appendix C Table 10), the ELECTRA paper
# (arXiv:2003.10555, Table 4) with google-research/electra's configure_finetuning.py, and the microsoft/DeBERTa README
# and model cards for the modern encoders. Per-GPU batch x GPUs x accumulation is the published command's; `gpus` is
# an assumption for the XLNet rows and a stated choice for RoBERTa and ELECTRA, whose sources give only the global
# batch (see their recipes). `warmup` / `wd` default to run_squad.py's 0.0.
PUBLISHED = {
    "bert_base_squad1": dict(model="google-bert/bert-base-uncased", version="1.1", seq=384, epochs=2, lr=3e-5,
                             per_gpu=12, gpus=1, accum=1, f1=88.52, em=81.22),
    "bert_large_wwm_squad1": dict(model="google-bert/bert-large-uncased-whole-word-masking", version="1.1", seq=384,
                                  epochs=2, lr=3e-5, per_gpu=3, gpus=8, accum=1, f1=93.15, em=86.91),
    "bert_base_rkq_squad1_512": dict(model="zhiheng-huang/bert-base-uncased-embedding-relative-key-query",
                                     version="1.1", seq=512, epochs=2, lr=3e-5, per_gpu=6, gpus=8, accum=1,
                                     f1=90.54, em=83.68),
    "bert_base_rkq_squad1_384": dict(model="zhiheng-huang/bert-base-uncased-embedding-relative-key-query",
                                     version="1.1", seq=384, epochs=2, lr=3e-5, per_gpu=6, gpus=8, accum=1,
                                     f1=90.34, em=None),
    "bert_base_rk_squad1": dict(model="zhiheng-huang/bert-base-uncased-embedding-relative-key", version="1.1",
                                seq=512, epochs=2, lr=3e-5, per_gpu=6, gpus=8, accum=1, f1=89.51, em=None),
    "bert_large_wwm_rkq_squad1_512": dict(
        model="zhiheng-huang/bert-large-uncased-whole-word-masking-embedding-relative-key-query", version="1.1",
        seq=512, epochs=2, lr=3e-5, per_gpu=2, gpus=8, accum=3, f1=93.52, em=None),
    "xlnet_large_squad1": dict(model="xlnet/xlnet-large-cased", version="1.1", seq=384, epochs=2, lr=3e-5,
                               per_gpu=4, gpus=1, accum=1, f1=92.60, em=85.46),
    "xlnet_large_squad2": dict(model="xlnet/xlnet-large-cased", version="2.0", seq=384, epochs=4, lr=3e-5,
                               per_gpu=2, gpus=1, accum=1, f1=84.07, em=80.42),
    "roberta_large_squad1": dict(model="FacebookAI/roberta-large", version="1.1", seq=384, epochs=2, lr=1.5e-5,
                                 per_gpu=48, gpus=1, accum=1, f1=94.6, em=88.9, warmup=0.06, wd=0.01),
    "roberta_large_squad2": dict(model="FacebookAI/roberta-large", version="2.0", seq=384, epochs=2, lr=1.5e-5,
                                 per_gpu=48, gpus=1, accum=1, f1=89.4, em=86.5, warmup=0.06, wd=0.01),
    "electra_large_squad2": dict(model="google/electra-large-discriminator", version="2.0", seq=512, epochs=2,
                                 lr=5e-5, per_gpu=32, gpus=1, accum=1, f1=90.6, em=88.0, warmup=0.1, wd=0.01),
    # Scores published, fine-tuning schedule not: lr, epochs and 8 x 8 come from the model card's MNLI command.
    "deberta_v3_base_squad2": dict(model="microsoft/deberta-v3-base", version="2.0", seq=384, epochs=3, lr=2e-5,
                                   per_gpu=8, gpus=8, accum=1, f1=88.4, em=85.4, warmup=0.027),
    "deberta_v3_large_squad2": dict(model="microsoft/deberta-v3-large", version="2.0", seq=384, epochs=2, lr=6e-6,
                                    per_gpu=8, gpus=8, accum=1, f1=91.5, em=89.0, warmup=0.004),
}
# Rows whose score is published but whose SQuAD fine-tuning settings are not: the recipe must say so.
SCHEDULE_NOT_PUBLISHED = {"deberta_v3_base_squad2", "deberta_v3_large_squad2"}
# Published settings squad-ds has no key or head for: each recipe's header comment and docs/RECIPES.md name them.
KNOWN_DIFFERENCES = {
    "roberta_large_squad2": ("answerability classifier",),
    "electra_large_squad2": ("layer-wise learning-rate decay 0.9", "answerability"),
    "deberta_v3_base_squad2": ("NOT PUBLISHED",),
    "deberta_v3_large_squad2": ("NOT PUBLISHED",),
}
RECIPES_DOC = Path(__file__).resolve().parents[1] / "docs" / "RECIPES.md"


def documented_world(name: str) -> int | None:
    return load_recipe(name).published_world_size


def ds_name(recipe) -> str:
    return recipe.deepspeed_config or default_ds_config(cuda=True)[0]


def resolve(recipe, world: int):
    name = ds_name(recipe)
    return resolve_ds_config(load_ds_config(name), recipe, world_size=world, num_features=SQUAD11_TRAIN_FEATURES,
                             cuda=not is_cpu_config(name))


def published_base(name: str) -> str | None:
    base = name[: -len(LARGE)] if name.endswith(LARGE) else name
    return base if base in PUBLISHED else None


def test_every_published_row_and_its_variant_ships():
    for name in PUBLISHED:
        assert name in RECIPES
    for name in ("tiny", "minilm_squad1_full", "minilm_squad1_full_cpu", "demo"):
        assert name in RECIPES
    for name in RECIPES:
        assert name in UNPUBLISHED or published_base(name), f"{name}: not a known published row or its variant"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_round_trips(name):
    recipe = load_recipe(name)  # constructs the typed dataclasses: every value is type-checked and validated
    assert recipe.description.strip(), f"{name}: a recipe says what it is and where its numbers come from"
    assert recipe.output.dir == f"runs/{name}" or name == "demo", "each recipe writes to its own run directory"
    again = recipe_from_dict(yaml.safe_load(dump_recipe(recipe)), "dump")
    assert again == recipe


@pytest.mark.parametrize("name", RECIPES)
def test_batch_arithmetic_matches_the_documented_gpu_count(name, monkeypatch):
    recipe = load_recipe(name)
    tr = recipe.train
    world = documented_world(name)
    if tr.train_batch_size is None:
        assert world is None, f"{name}: documents world_size {world} but pins no train.train_batch_size"
        worlds = [1, 2]
    else:
        assert world is not None, f"{name}: pins train_batch_size {tr.train_batch_size}: say published_world_size: N"
        assert tr.micro_batch_size * tr.gradient_accumulation_steps * world == tr.train_batch_size
        worlds = [world]
    for w in worlds:
        resolved, plan = resolve(recipe, w)
        assert resolved["train_batch_size"] == plan.global_batch == plan.micro_batch * plan.accumulation * w
        if tr.train_batch_size is not None:
            assert plan.global_batch == tr.train_batch_size
        assert plan.micro_batch == tr.micro_batch_size
        parsed = deepspeed_parse(resolved, w, monkeypatch)
        assert parsed.train_batch_size == plan.global_batch
        build_scheduler(resolved)
        if tr.max_steps is None:
            micro_batches_per_epoch = math.ceil(math.ceil(SQUAD11_TRAIN_FEATURES / w) / plan.micro_batch)
            assert plan.total_steps == math.ceil(tr.epochs * micro_batches_per_epoch / plan.accumulation)
            assert plan.warmup_steps <= max(1, tr.warmup_proportion * plan.total_steps)
        else:
            assert plan.total_steps == tr.max_steps


@pytest.mark.parametrize("name", [n for n in RECIPES if load_recipe(n).train.train_batch_size is not None])
def test_another_gpu_count_is_refused_not_silently_rescaled(name):
    """A pinned global batch is the published one: launching on other hardware must fail loudly..."""
    recipe = load_recipe(name)
    with pytest.raises(ConfigError, match="train_batch_size"):
        resolve(recipe, documented_world(name) * 2)
    # ...and the documented escape keeps the global batch by deriving the accumulation.
    w = 2 * documented_world(name)
    if recipe.train.train_batch_size % (recipe.train.micro_batch_size * w) == 0:
        derived = load_recipe(name, ["train.gradient_accumulation_steps=null"])
        _, plan = resolve(derived, w)
        assert plan.global_batch == recipe.train.train_batch_size


@pytest.mark.parametrize("name", [n for n in RECIPES if n.endswith(LARGE)])
def test_large_batch_variant_keeps_the_global_batch(name):
    base_name = name[: -len(LARGE)]
    assert base_name in RECIPES
    big, base = load_recipe(name), load_recipe(base_name)
    big_world, base_world = documented_world(name), documented_world(base_name)
    assert big.train.train_batch_size == base.train.train_batch_size
    assert resolve(big, big_world)[1].global_batch == resolve(base, base_world)[1].global_batch
    assert big.train.micro_batch_size > base.train.micro_batch_size
    assert big.train.gradient_accumulation_steps * big_world < base.train.gradient_accumulation_steps * base_world
    assert big.train.gradient_accumulation_steps <= base.train.gradient_accumulation_steps
    assert big_world <= base_world
    # Made to fit with bf16, ZeRO >= 2 and activation checkpointing.
    assert big.train.activation_checkpointing is True
    ds = load_ds_config(ds_name(big))
    assert (ds.get("bf16") or {}).get("enabled") is True
    assert ds["zero_optimization"]["stage"] >= 2
    # Everything else is the published row's.
    same = lambda r: {**dataclasses.asdict(r), "description": None, "deepspeed_config": None,  # noqa: E731
                      "output": None, "published_world_size": None,
                      "train": {k: v for k, v in dataclasses.asdict(r.train).items()
                                if k not in ("micro_batch_size", "gradient_accumulation_steps",
                                             "activation_checkpointing")}}
    assert same(big) == same(base)
    assert "Memory" in recipe_path(name).read_text(encoding="utf-8"), f"{name}: comment the memory reasoning"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_splittable_published_rows_have_a_large_batch_variant(name):
    """A bigger micro-batch for the same global batch exists unless the batch is already one micro-batch."""
    recipe = load_recipe(name)
    if recipe.train.micro_batch_size < recipe.train.train_batch_size:
        assert f"{name}{LARGE}" in RECIPES
    else:
        assert documented_world(name) == 1 and recipe.train.gradient_accumulation_steps == 1
        assert f"{name}{LARGE}" not in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_published_hyperparameters_and_scores(name):
    recipe = load_recipe(name)
    base = published_base(name)
    if base is None:
        assert name in UNPUBLISHED
        assert recipe.expected == {}, f"{name}: no published score, so no expected score"
        return
    row = PUBLISHED[base]
    assert recipe.model.name_or_path == row["model"]
    d = recipe.data
    assert (d.version, d.max_seq_length, d.doc_stride, d.max_query_length) == (row["version"], row["seq"], 128, 64)
    tr = recipe.train
    assert (tr.epochs, tr.lr, tr.max_steps) == (row["epochs"], pytest.approx(row["lr"]), None)
    # Written out, never left to squad-ds's own defaults (run_squad.py's: no warmup, no weight decay).
    assert tr.warmup_proportion == pytest.approx(row.get("warmup", 0.0))
    assert tr.weight_decay == pytest.approx(row.get("wd", 0.0))
    assert tr.train_batch_size == row["per_gpu"] * row["gpus"] * row["accum"]
    if name == base:
        assert documented_world(name) == row["gpus"]
        assert (tr.micro_batch_size, tr.gradient_accumulation_steps) == (row["per_gpu"], row["accum"])
        assert tr.activation_checkpointing is False
    assert (recipe.eval.n_best_size, recipe.eval.max_answer_length) == (20, 30)
    expected = {"f1": row["f1"]} | ({"exact_match": row["em"]} if row["em"] is not None else {})
    assert recipe.expected == pytest.approx(expected)
    assert set(recipe.expected) <= {"f1", "exact_match"}
    assert f"{row['f1']:.2f}" in recipe.description, f"{name}: the description cites the published F1"


@pytest.mark.parametrize("name", sorted(KNOWN_DIFFERENCES))
def test_settings_squad_ds_cannot_reproduce_are_written_down(name):
    """A published setting without a squad-ds key (layer-wise lr decay, an answerability head) or a schedule the
    authors never published is said in the recipe's header and in docs/RECIPES.md, not silently dropped."""
    text = recipe_path(name).read_text(encoding="utf-8")
    header = text[: text.index("description:")]
    doc = RECIPES_DOC.read_text(encoding="utf-8")
    assert f"`{name}`" in doc
    for phrase in KNOWN_DIFFERENCES[name]:
        assert phrase.lower() in header.lower(), f"{name}: the header comment does not mention {phrase!r}"
        assert phrase.lower() in doc.lower(), f"docs/RECIPES.md does not mention {phrase!r}"
    if name in SCHEDULE_NOT_PUBLISHED:
        assert "no squad fine-tuning settings" in load_recipe(name).description.lower()


@pytest.mark.parametrize("name", RECIPES)
def test_data_files_match_the_squad_version(name):
    recipe = load_recipe(name)
    d = recipe.data
    for f in (d.train_file, d.eval_file):
        assert f is not None
        if f.startswith("sample:"):
            continue
        assert f.startswith("${SQUAD_DIR}/"), f"{name}: full-data paths are relative to $SQUAD_DIR, got {f}"
        if d.version == "2.0":
            assert "v2.0" in f
        else:
            assert "v1.1" in f
    if d.version == "2.0":
        assert "null_score_diff_threshold" in yaml.safe_load(recipe_path(name).read_text())["eval"], \
            f"{name}: a v2.0 recipe states its no-answer threshold"


@pytest.mark.parametrize("name", [n for n in RECIPES if "${SQUAD_DIR}" in recipe_path(n).read_text()])
def test_squad_dir_paths_follow_the_environment(name, monkeypatch, tmp_path):
    recipe = load_recipe(name)
    files = (recipe.data.train_file, recipe.data.eval_file)
    monkeypatch.delenv("SQUAD_DIR", raising=False)
    for f in files:
        with pytest.raises(ConfigError, match="SQUAD_DIR"):
            resolve_data_path(f)
    monkeypatch.setenv("SQUAD_DIR", str(tmp_path))
    for f in files:
        expected = str(tmp_path / f.split("/", 1)[1])
        assert os.path.expandvars(f) == expected
        with pytest.raises(FileNotFoundError, match=re.escape(expected)):
            resolve_data_path(f)
        (tmp_path / f.split("/", 1)[1]).write_text("{}")
        assert resolve_data_path(f) == expected


def test_minilm_full_recipe_finds_the_real_files(squad_dir, monkeypatch):
    """With the real data folder the GPU accuracy recipe's files exist (the others need the official train files)."""
    monkeypatch.setenv("SQUAD_DIR", str(squad_dir))
    recipe = load_recipe("minilm_squad1_full")
    for f in (recipe.data.train_file, recipe.data.eval_file):
        assert os.path.isfile(resolve_data_path(f))
    assert load_recipe("bert_base_squad1").data.eval_file == recipe.data.eval_file


def test_minilm_full_recipe():
    recipe = load_recipe("minilm_squad1_full")
    assert recipe.model.name_or_path == "all-MiniLM-L6-v2"
    assert recipe.data.train_file == "${SQUAD_DIR}/train-v1.1.reconstructed.json"
    assert recipe.data.eval_file == "${SQUAD_DIR}/dev-v1.1.json"
    assert recipe.train.epochs == 2 and recipe.train.max_steps is None
    assert not is_cpu_config(ds_name(recipe))


def test_minilm_full_cpu_recipe_is_the_gpu_run_laid_out_for_a_cpu():
    """The CPU full run differs from the GPU one only in precision/optimizer config, the micro-batch layout of the
    same global batch, and its checkpoint/eval intervals."""
    gpu, cpu = load_recipe("minilm_squad1_full"), load_recipe("minilm_squad1_full_cpu")
    assert cpu.model == gpu.model and cpu.data == gpu.data and cpu.eval == gpu.eval
    same = ("epochs", "max_steps", "seed", "train_batch_size", "lr", "warmup_proportion", "weight_decay",
            "group_by_length", "optimizer", "activation_checkpointing")
    assert {k: getattr(cpu.train, k) for k in same} == {k: getattr(gpu.train, k) for k in same}
    assert cpu.train.micro_batch_size * cpu.train.gradient_accumulation_steps == gpu.train.train_batch_size == 64
    assert 0 < cpu.train.save_steps <= 100 and cpu.train.eval_steps > 0
    # No config named: the CPU's measured precision, either of the two CPU configs, with the same batch plan.
    assert cpu.deepspeed_config is None
    for name in ("cpu_fp32", "cpu_bf16_autocast"):
        _, plan = resolve_ds_config(load_ds_config(name), cpu, world_size=1, num_features=88524, cuda=False)
        assert (plan.micro_batch, plan.accumulation, plan.global_batch, plan.total_steps) == (16, 4, 64, 2767)


def test_tiny_recipe_is_small_cpu_and_overridable(tmp_path):
    recipe = load_recipe("tiny")
    d = recipe.data
    assert (d.max_seq_length, d.doc_stride, d.max_query_length) == (64, 32, 16)
    assert d.train_file.startswith("sample:") and d.eval_file.startswith("sample:")
    assert recipe.train.max_steps is not None and recipe.train.max_steps <= 10
    assert is_cpu_config(ds_name(recipe))
    resolved, plan = resolve_ds_config(load_ds_config(ds_name(recipe)), recipe, world_size=2, num_features=300,
                                       cuda=False)
    assert plan.total_steps == recipe.train.max_steps and resolved["optimizer"]["params"]["torch_adam"] is True
    moved = load_recipe("tiny", [f"model.name_or_path={tmp_path}", f"output.dir={tmp_path / 'run'}"])
    assert moved.model.name_or_path == str(tmp_path) and moved.output.dir == str(tmp_path / "run")

