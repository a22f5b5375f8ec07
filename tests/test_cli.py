"""The command line as people expect it: --version, `recipes`, `config --keys`, both spellings of every long option,
an instant `train --help` without DeepSpeed's deprecated flags, stdout carrying only the result JSON, and errors that
say the way out."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer_util import REPO, env, make_tiny_model, write_recipe

from squad_ds import __version__
from squad_ds.cli import main
from squad_ds.config import ConfigError, list_recipes, load_recipe
from squad_ds.options import ArgumentParser, dashed, train_parser
from squad_ds.training.assemble import resolve_run


def run_cli(*args: str, timeout: int = 600, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squad_ds.cli", *args], env=env(), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"squad-ds {__version__}"


def test_recipes_lists_every_named_recipe_with_its_published_row(capsys):
    assert main(["recipes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == list_recipes()
    wwm = rows["bert_large_wwm_squad1"]
    assert (wwm["f1"], wwm["exact_match"], wwm["world_size"], wwm["squad"]) == (93.15, 86.91, 8, "1.1")
    assert rows["xlnet_large_squad2"]["squad"] == "2.0" and rows["demo"]["world_size"] is None
    assert main(["recipes"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["recipe", "model", "SQuAD", "F1", "EM", "GPUs"] and len(table) == len(rows) + 1


def test_config_keys_lists_types_and_defaults(capsys):
    assert main(["config", "--keys"]) == 0
    keys = json.loads(capsys.readouterr().out)
    assert keys["train"]["lr"]["default"] is None and "float" in keys["train"]["lr"]["type"]
    assert keys["data"]["max_seq_length"] == {"type": "int", "default": 384}


@pytest.mark.parametrize("token, expected", [
    ("--deepspeed_config", "--deepspeed-config"), ("--deepspeed_config=a_b.json", "--deepspeed-config=a_b.json"),
    ("--set", "--set"), ("train.micro_batch_size=4", "train.micro_batch_size=4"), ("-h", "-h"), ("--", "--")])
def test_dashed_changes_only_option_names(token, expected):
    assert dashed(token) == expected


def test_both_spellings_everywhere():
    p = ArgumentParser(prog="t")
    p.add_argument("--out-dir")
    p.add_argument("rest", nargs="*")
    assert p.parse_args(["--out_dir", "x"]).out_dir == "x"
    assert p.parse_args(["--out-dir=y"]).out_dir == "y"
    assert p.parse_args(["--", "--not_an_option"]).rest == ["--not_an_option"]
    for args in (["--deepspeed_config", "zero2_bf16"], ["--deepspeed-config", "zero2_bf16"],
                 ["--deepspeed", "zero2_bf16"]):
        parsed = train_parser().parse_args([*args, "--local_rank=0", "--set", "train.micro_batch_size=4"])
        assert (parsed.deepspeed_config or parsed.deepspeed_flag) == "zero2_bf16"
        assert parsed.overrides == ["train.micro_batch_size=4"] and parsed.local_rank == 0
    assert train_parser().parse_args(["--deepspeed"]).deepspeed_flag is True  # DeepSpeed's bare flag


def test_squad_ds_alone_is_a_short_guide_and_help_speaks_to_users(capsys):
    """`squad-ds` with no sub-command: every sub-command with one line, and the commands to start with; --help
    describes the tool, not the module (it used to print the module's docstring about argument parsing)."""
    assert main([]) == 0
    guide = capsys.readouterr().out
    for command in ("train", "predict", "evaluate", "preprocess", "config", "recipes", "export", "plot", "tune"):
        assert f"\n  {command} " in guide, command
    assert "squad-ds train " in guide and "squad-ds recipes " in guide and "--help" in guide
    assert len(guide.splitlines()) <= 30
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "question answering" in text and "argument parsing" not in text
    assert "squad-ds train" in text  # where to start


def test_train_help_is_instant_and_free_of_deprecated_flags():
    code = ("import sys\nfrom squad_ds.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('HEAVY', sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--deepspeed-config" in proc.stdout and "--ds-set" in proc.stdout and "config --keys" in proc.stdout
    assert "deepscale" not in proc.stdout


@pytest.mark.parametrize("module", ["squad_ds.train", "squad_ds.predict"])
def test_module_help_answers_before_torch_is_imported(module):
    """`python -m squad_ds.train --help` (how launchers run it) took 6.7 s: it imported torch, DeepSpeed and
    transformers before parsing. Now --help and a mistyped option answer first (-X importtime lists every import)."""
    for argv, code in ((["--help"], 0), (["--no-such-option"], 2)):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *argv], env=env(),
                              capture_output=True, text=True, timeout=120)
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        assert proc.returncode == code, proc.stderr[-2000:]
        assert not imported & {"torch", "deepspeed", "transformers", "numpy"}, sorted(imported)[:50]


def test_unknown_set_key_is_blamed_on_the_flag():
    with pytest.raises(ConfigError) as e:
        load_recipe("demo", ["train.bogus=1"])
    assert str(e.value).startswith("--set train.bogus=1: unknown key train.bogus (known: epochs,")
    with pytest.raises(ConfigError, match=r"^--set bogus\.x=1: unknown key 'bogus'"):
        load_recipe("demo", ["bogus.x=1"])


def test_published_multi_gpu_recipe_on_one_gpu_names_the_way_out():
    with pytest.raises(ConfigError) as e:
        resolve_run("bert_large_wwm_squad1", [], None, world_size=1, cuda=True)
    msg = str(e.value)
    assert "written for 8 processes" in msg and "--set train.gradient_accumulation_steps=null" in msg
    assert "3 × 8 accumulation steps" in msg and "bert_large_wwm_squad1_large_batch" in msg
    # and the way out works
    spec = resolve_run("bert_large_wwm_squad1", ["train.gradient_accumulation_steps=null"], None, world_size=1,
                       cuda=True)
    assert spec.plan(1000)[1].global_batch == 24


@pytest.mark.parametrize(("override", "message"), [
    ("gradient_clipping=eight", r"gradient_clipping='eight': a number >= 0"),
    ("gradient_clipping=-1", r"gradient_clipping=-1: a number >= 0"),
    ("optimizer.params.lr=eight", r"optimizer.params.lr='eight': a number > 0"),
    ("optimizer.params.betas=eight", r"optimizer.params.betas='eight': two numbers in \[0, 1\)"),
    ("optimizer.params.betas=[0.9,1.5]", r"optimizer.params.betas=\[0.9, 1.5\]: two numbers in \[0, 1\)"),
    ("optimizer.params.weight_decay=eight", r"optimizer.params.weight_decay='eight': a number >= 0"),
    ("train_batch_size=eight", r"train_batch_size='eight': a positive integer"),
    ("gradient_accumulation_steps=eight", r"gradient_accumulation_steps='eight': a positive integer"),
    ("train_micro_batch_size_per_gpu=eight", r"train_micro_batch_size_per_gpu='eight': a positive integer"),
    ("optimizer.type=Foo", r"optimizer.type='Foo': not an optimizer DeepSpeed knows"),
    ("scheduler.type=OneCycle", r"scheduler.type='OneCycle': squad-ds plans the schedule of WarmupLR and "
                                r"WarmupDecayLR"),
    ("zero_optimisation.stage=2", r"unknown key 'zero_optimisation' \(did you mean 'zero_optimization'\?\)"),
    ("bf16.enabled=maybe", r"bf16.enabled='maybe': true or false"),
])
def test_bad_deepspeed_values_are_one_line_before_any_work(override, message):
    """Each was found by hand (issue 23): a traceback, an error after minutes of start-up (optimizer.type=Foo after
    160 s), or silently accepted (a misspelt top-level key trained at ZeRO-0; gradient_clipping=-1)."""
    with pytest.raises(ConfigError, match=message):
        resolve_run("demo", [], "cpu_fp32", world_size=1, cuda=False, ds_overrides=[override])


def test_a_deepspeed_json_file_is_checked_alike(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "eight", "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match=r"ds.json: train_micro_batch_size_per_gpu='eight': a positive integer"):
        resolve_run("demo", [], str(path), world_size=1, cuda=False)
    path.write_text(json.dumps({"optimizer": {"type": "SGD", "params": {"lr": "auto"}}, "gradient_clipping": 1}))
    resolve_run("demo", ["train.warmup_proportion=0"], str(path), world_size=1, cuda=False)  # torch.optim's SGD


def test_ds_set_overrides_the_json_and_is_checked_like_it():
    spec = resolve_run("demo", [], "cpu_fp32", world_size=1, cuda=False,
                       ds_overrides=["zero_optimization.stage=2", "gradient_clipping=0.5"])
    assert spec.ds_raw["zero_optimization"]["stage"] == 2 and spec.ds_raw["gradient_clipping"] == 0.5
    assert spec.effective_document(100)["deepspeed_overrides"] == ["zero_optimization.stage=2",
                                                                    "gradient_clipping=0.5"]
    with pytest.raises(ConfigError, match="contradicts recipe train.lr"):
        resolve_run("demo", ["train.lr=1e-4"], "cpu_fp32", world_size=1, cuda=False,
                    ds_overrides=["optimizer.params.lr=3e-5"])
    with pytest.raises(ConfigError, match="ZeRO stages are 0, 1, 2 and 3"):
        resolve_run("demo", [], "cpu_fp32", world_size=1, cuda=False, ds_overrides=["zero_optimization.stage=5"])
    with pytest.raises(ConfigError, match=r"--ds-set 'train_batch_size\.x=1': train_batch_size is"):
        resolve_run("demo", [], "cpu_fp32", world_size=1, cuda=False, ds_overrides=["train_batch_size.x=1"])


def test_ds_set_reaches_the_commands(capsys):
    assert main(["config", "tiny", "--num-features", "100", "--device", "cpu", "--deepspeed_config", "cpu_fp32",
                 "--ds-set", "gradient_clipping=0.25"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["deepspeed"]["gradient_clipping"] == 0.25 and doc["deepspeed_overrides"] == ["gradient_clipping=0.25"]
    assert main(["config", "tiny", "--num-features", "100", "--device", "cpu", "--ds-set",
                 "train_batch_size=7"]) == 2
    assert "train_batch_size 7" in capsys.readouterr().err


def test_swapped_evaluate_arguments_are_recognised(tmp_path):
    from squad_ds.sample_data import SAMPLE_DEV

    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps({"x": "y"}))
    for data in (str(SAMPLE_DEV), "sample:dev"):
        proc = run_cli("evaluate", str(preds), data)
        assert proc.returncode == 2 and proc.stdout == ""
        assert "look swapped" in proc.stderr and "evaluate DATA PREDICTIONS" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", dropout=0.1)


def test_train_stdout_is_only_the_result_json(tmp_path, tiny):
    """`squad-ds train | jq .f1`: DeepSpeed's logger writes to stdout; the boundary sends it to stderr."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "out", data={"max_eval_examples": 4},
                          train={"max_steps": 2})
    proc = run_cli("train", "--recipe", str(recipe), "--deepspeed_config", "cpu_fp32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert result["global_step"] == 2 and "f1" in result and proc.stdout.count("\n") == 1
    assert "[squad-ds r0]" in proc.stderr
