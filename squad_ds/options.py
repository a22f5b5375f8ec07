"""How every squad-ds command line reads: one parser class (both spellings of a long option), the DeepSpeed options
train, config and tune share, and the parsers of the two commands that also run under launchers (`python -m
squad_ds.train` / `squad_ds.predict`). Imports nothing heavy: `squad-ds train --help` and a mistyped option answer
without loading torch or DeepSpeed."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def dashed(token: str) -> str:
    """`--deepspeed_config=X` -> `--deepspeed-config=X`: only the option's name, never its value."""
    if not token.startswith("--") or token == "--":
        return token
    name, eq, value = token.partition("=")
    return name.replace("_", "-") + eq + value


class ArgumentParser(argparse.ArgumentParser):
    """Long options are declared with dashes; `--foo_bar` on the command line means `--foo-bar` (DeepSpeed and the
    Hugging Face scripts spell options with underscores, POSIX tools with dashes: both work everywhere)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)  # after "--" every token is a positional value
        return super().parse_known_args([dashed(a) for a in args[:end]] + args[end:], namespace)


SPELLING_NOTE = "Options may be spelled with dashes or underscores (--deepspeed-config, --deepspeed_config)."


def add_deepspeed_arguments(p: argparse.ArgumentParser) -> None:
    """The DeepSpeed JSON of a run, and `--ds-set` overrides of its keys (one declaration for train, config and
    tune). `--deepspeed` is accepted as DeepSpeed's launcher scripts pass it (a bare flag) and as the Hugging Face
    scripts do (`--deepspeed ds_config.json`)."""
    p.add_argument("--deepspeed-config", dest="deepspeed_config", default=None, metavar="JSON",
                   help="DeepSpeed JSON (path or shipped name); default: the recipe's, else the hardware's")
    p.add_argument("--deepspeed", dest="deepspeed_flag", nargs="?", const=True, default=None, metavar="JSON",
                   help="same as --deepspeed-config when given a JSON; alone, accepted and ignored (DeepSpeed is "
                        "always on)")
    p.add_argument("--ds-set", dest="ds_overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a DeepSpeed JSON value, e.g. zero_optimization.stage=3 (repeatable; checked "
                        "against the recipe as the file's values are)")


def deepspeed_config_arg(args: argparse.Namespace) -> str | None:
    """The DeepSpeed JSON named by --deepspeed-config or by --deepspeed JSON (both given: they must agree)."""
    from squad_ds.errors import ConfigError

    named = args.deepspeed_flag if isinstance(args.deepspeed_flag, str) else None
    if named and args.deepspeed_config and named != args.deepspeed_config:
        raise ConfigError(f"--deepspeed {named} and --deepspeed-config {args.deepspeed_config}: two different "
                          "DeepSpeed configs (give one)")
    return args.deepspeed_config or named


def train_parser(prog: str = "squad-ds train") -> ArgumentParser:
    """DeepSpeed's own `--deepspeed`/`--deepspeed_config` are declared by add_deepspeed_arguments; its deprecated
    `--deepscale*` are not offered."""
    from squad_ds.config import add_recipe_arguments

    p = ArgumentParser(prog=prog, description="Fine-tune a QA model with DeepSpeed. Recipe keys, their types and "
                       "defaults: `squad-ds config --keys`; named recipes: `squad-ds recipes`.", epilog=SPELLING_NOTE)
    add_recipe_arguments(p)
    add_deepspeed_arguments(p)
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint of this run) or a path; "
                   "without it a run continues from output.dir's checkpoints when there are any")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output.dir that holds an earlier run (its checkpoints are removed)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="upload the exported model (output.export) to this Hugging Face Hub repository at the end")
    p.add_argument("--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p


def predict_parser(prog: str = "squad-ds predict") -> ArgumentParser:
    from squad_ds.config import add_recipe_arguments

    p = ArgumentParser(prog=prog, description="Predict answers with a trained model directory.",
                       epilog=SPELLING_NOTE)
    p.add_argument("data", help="SQuAD JSON (.json/.json.gz) or sample:NAME")
    p.add_argument("--model", required=True, help="HF model directory (e.g. RUN_DIR/model) or hub name")
    p.add_argument("--out-dir", default=None, help="where predictions go (default: MODEL/predictions)")
    add_recipe_arguments(p, recipe_help="recipe for data/eval settings (default: the one saved with the model, "
                         "else defaults)")
    p.add_argument("--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p
