"""`squad-ds` command line: argument parsing only; each sub-command hands off to the module that owns it."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from squad_ds.data.files import resolve_data_path
    from squad_ds.errors import ConfigError
    from squad_ds.scoring.metrics import evaluate_files

    if args.out_file and Path(args.out_file).is_dir():
        raise ConfigError(f"--out-file {args.out_file}: a directory; give the path of the file to write")
    result = evaluate_files(resolve_data_path(args.data), args.predictions, na_prob_file=args.na_prob_file,
                            na_prob_thresh=args.na_prob_thresh, allow_missing=args.allow_missing)
    text = json.dumps(result)
    print(text)
    if args.out_file:
        with open(args.out_file, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from squad_ds.data.files import resolve_data_path
    from squad_ds.data.preprocess import preprocess_command
    from squad_ds.modeling.factory import load_tokenizer

    path = resolve_data_path(args.data)  # a bad file name fails before the tokenizer loads
    summary = preprocess_command(path, tokenizer=load_tokenizer(args.tokenizer), max_seq_length=args.max_seq_length,
                                 doc_stride=args.doc_stride, max_query_length=args.max_query_length,
                                 split=args.split, cache_dir=args.cache_dir, num_workers=args.num_workers)
    print(json.dumps(summary))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from squad_ds.effective import effective_config

    cuda = {"auto": None, "cpu": False, "cuda": True}[args.device]
    doc = effective_config(args.recipe, args.overrides, args.deepspeed_config, world_size=args.world_size,
                           num_features=args.num_features, cuda=cuda)
    print(json.dumps(doc, indent=2))
    return 0


# Sub-commands with their own full parsers (they also run as `python -m squad_ds.MODULE` under launchers).
_DELEGATED = {"train": "squad_ds.train", "predict": "squad_ds.predict"}


def build_parser() -> argparse.ArgumentParser:
    from squad_ds.config import DataConfig, add_recipe_arguments

    p = argparse.ArgumentParser(prog="squad-ds", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="fine-tune with DeepSpeed (`squad-ds train --help`); no arguments: embedded demo",
                   add_help=False)
    sub.add_parser("predict", help="predict (and score) with a trained model directory", add_help=False)

    ev = sub.add_parser("evaluate", help="score predictions with the official SQuAD v1.1/v2.0 EM/F1")
    ev.add_argument("data", help="SQuAD JSON (.json or .json.gz) with gold answers, or sample:NAME")
    ev.add_argument("predictions", help="JSON object: question id -> answer text")
    ev.add_argument("--na-prob-file", help="JSON object: question id -> probability of no answer (v2.0)")
    ev.add_argument("--na-prob-thresh", type=float, default=1.0, help="predict no-answer above this (default 1.0)")
    ev.add_argument("--out-file", "-o", help="also write the JSON result here")
    ev.add_argument("--allow-missing", action="store_true",
                    help="v2.0: score only the ids present in the predictions instead of failing")
    ev.set_defaults(func=_cmd_evaluate)

    pp = sub.add_parser("preprocess", help="tokenize a SQuAD file into (cached) features")
    pp.add_argument("data", help="SQuAD JSON (.json or .json.gz), or sample:NAME")
    pp.add_argument("--tokenizer", required=True, help="local directory or hub name of a fast tokenizer")
    pp.add_argument("--max-seq-length", type=int, default=DataConfig.max_seq_length)
    pp.add_argument("--doc-stride", type=int, default=DataConfig.doc_stride)
    pp.add_argument("--max-query-length", type=int, default=DataConfig.max_query_length)
    pp.add_argument("--split", choices=["train", "eval"], default="train")
    pp.add_argument("--cache-dir", default=None, help="default: ~/.cache/squad_ds/features")
    pp.add_argument("--num-workers", type=int, default=None,
                    help="1 (default): in-process, the Rust tokenizer uses every core; N > 1: a pool of N processes")
    pp.set_defaults(func=_cmd_preprocess)

    cf = sub.add_parser("config", help="print the effective recipe + resolved DeepSpeed JSON + step plan (no training)")
    add_recipe_arguments(cf, positional=True)
    cf.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                    help="DeepSpeed JSON (path or shipped name); default: the recipe's, else the hardware's")
    cf.add_argument("--world-size", type=int, default=None, help="processes of the run (default: $WORLD_SIZE or 1)")
    cf.add_argument("--num-features", type=int, default=None,
                    help="train features for the step plan (default: count them with the cached featurizer)")
    cf.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="resolve as for this device (default: the one here)")
    cf.set_defaults(func=_cmd_config)

    from squad_ds.tune import search as tune

    tu = sub.add_parser("tune", help=tune.HELP)
    tune.add_arguments(tu)
    tu.set_defaults(func=tune.command)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATED:
        import importlib

        if argv[0] == "train":
            from squad_ds import preempt

            preempt.install()  # before the trainer's heavy imports

        return importlib.import_module(_DELEGATED[argv[0]]).main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from squad_ds.errors import run_main

    return run_main(f"squad-ds {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
