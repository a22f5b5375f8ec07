"""`squad-ds` command line: argument parsing only; each sub-command hands off to the module that owns it. Every
sub-command prints its result as one JSON document on stdout, everything else on stderr (errors.run_main)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from squad_ds import __version__, atomic
from squad_ds.errors import emit_result, emit_text
from squad_ds.options import SPELLING_NOTE, ArgumentParser, add_deepspeed_arguments, deepspeed_config_arg

DESCRIPTION = ("Fine-tune BERT-family encoders for extractive question answering (SQuAD v1.1 and v2.0) with DeepSpeed; "
               "evaluate, predict, export and plot the runs. Every command prints its result as one JSON document on "
               "stdout, everything else on stderr.")
START = (("squad-ds train", "train and score the embedded demo (about 3 minutes on 2 CPU cores)"),
         ("squad-ds recipes", "the named recipes, with the scores they were published with"),
         ("squad-ds train --help", "every training option (`squad-ds COMMAND --help` for the others)"))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from squad_ds.data.files import resolve_data_path
    from squad_ds.errors import ConfigError
    from squad_ds.scoring.metrics import evaluate_files

    if args.out_file and Path(args.out_file).is_dir():
        raise ConfigError(f"--out-file {args.out_file}: a directory; give the path of the file to write")
    # A sample name in the predictions' place is a SQuAD file given second: resolved, the swap is recognised.
    predictions = resolve_data_path(args.predictions) if args.predictions.startswith("sample:") else args.predictions
    data = resolve_data_path(args.data)
    if args.out_file and Path(args.out_file).exists():
        for name, given in (("the data file", data), ("the predictions", predictions),
                            ("--na-prob-file", args.na_prob_file)):
            if given and Path(given).exists() and os.path.samefile(args.out_file, given):
                raise ConfigError(f"--out-file {args.out_file} is {name} this command reads: writing the scores "
                                  "there would replace it; give another file")
    result = evaluate_files(data, predictions, na_prob_file=args.na_prob_file,
                            na_prob_thresh=args.na_prob_thresh, allow_missing=args.allow_missing)
    emit_result(result)
    if args.out_file:
        atomic.write_text(args.out_file, json.dumps(result) + "\n")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from squad_ds.data.files import resolve_data_path
    from squad_ds.data.preprocess import preprocess_command
    from squad_ds.modeling.factory import load_tokenizer

    path = resolve_data_path(args.data)  # a bad file name fails before the tokenizer loads
    summary = preprocess_command(path, tokenizer=load_tokenizer(args.tokenizer), max_seq_length=args.max_seq_length,
                                 doc_stride=args.doc_stride, max_query_length=args.max_query_length,
                                 split=args.split, cache_dir=args.cache_dir, num_workers=args.num_workers)
    emit_result(summary)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from squad_ds.plan import plan

    emit_result(plan(args.recipe, args.overrides, model=args.model, shape=args.shape, cpu_memory_gib=args.cpu_memory,
                     gpus=args.gpus, gpu_memory_gib=args.gpu_memory, nodes=args.nodes, nvme_gib=args.nvme),
                indent=2)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from squad_ds.effective import effective_config

    if args.keys:
        from squad_ds.config import recipe_keys

        emit_result(recipe_keys(), indent=2)
        return 0

    cuda = {"auto": None, "cpu": False, "cuda": True}[args.device]
    doc = effective_config(args.recipe, args.overrides, deepspeed_config_arg(args), world_size=args.world_size,
                           num_features=args.num_features, cuda=cuda, ds_overrides=args.ds_overrides)
    emit_result(doc, indent=2)
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from squad_ds.config import recipe_table

    rows = recipe_table()
    if args.json:
        emit_result(rows, indent=2)
        return 0
    cols = ("name", "model", "squad", "f1", "exact_match", "world_size")
    head = ("recipe", "model", "SQuAD", "F1", "EM", "GPUs")
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [list(head), *cells]]
    emit_text("\n".join(lines) + "\n")  # a table for people; --json for scripts
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from squad_ds.training.export import export_command

    emit_result(export_command(args.source, args.step, args.best, args.out, args.push_to_hub, args.onnx))
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from squad_ds.ask import ask_command

    return ask_command(args.model, question=args.question, context=args.context, context_file=args.context_file,
                       input_path=args.input, top_k=args.top_k, version=args.squad_version, recipe=args.recipe,
                       overrides=args.overrides, emit=emit_result)


def _cmd_serve(args: argparse.Namespace) -> int:
    from squad_ds.serve import serve_command

    emit_result(serve_command(args.model, host=args.host, port=args.port, recipe=args.recipe,
                              overrides=args.overrides, version=args.squad_version, allow_hosts=args.allow_host,
                              allow_origins=args.allow_origin))
    return 0


def _cmd_hosts(args: argparse.Namespace) -> int:
    from squad_ds.hosts import hosts_command

    result = hosts_command(args.hostfile, args.recipe, args.overrides, args.master_addr, args.master_port,
                           args.ssh_port, args.launcher)
    for line in result["problems"]:
        print(f"squad-ds hosts: {line}", file=sys.stderr)
    emit_result(result)
    return 2 if result["problems"] else 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from squad_ds.plot import plot_command

    emit_result(plot_command(args.run_dir, args.out, args.title, args.smooth))
    return 0


# Sub-commands with their own full parsers (they also run as `python -m squad_ds.MODULE` under launchers).
_DELEGATED = {"train": "squad_ds.train", "predict": "squad_ds.predict"}


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model and its settings, for the commands that ask a trained model (ask, serve)."""
    from squad_ds.config import add_recipe_arguments

    p.add_argument("--model", required=True, help="model directory: an export, or any local QA checkpoint")
    p.add_argument("--squad-version", choices=["1.1", "2.0"], default=None,
                   help="2.0: the model may abstain (default: the model's recipe or scores, else 1.1)")
    add_recipe_arguments(p, recipe_help="recipe for the windows and post-processing (default: the one the model "
                         "was exported with, else the embedded demo's)")


def build_parser() -> argparse.ArgumentParser:
    from squad_ds.config import DataConfig, add_recipe_arguments

    starts = "\n".join(f"  {command:<24}{what}" for command, what in START)
    p = ArgumentParser(prog="squad-ds", description=textwrap.fill(DESCRIPTION, 100),
                       epilog=f"start with:\n{starts}\n\n{SPELLING_NOTE}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"squad-ds {__version__}")
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
    add_deepspeed_arguments(cf)
    cf.add_argument("--keys", action="store_true", help="list every recipe key with its type and default, and stop")
    cf.add_argument("--world-size", type=int, default=None, help="processes of the run (default: $WORLD_SIZE or 1)")
    cf.add_argument("--num-features", type=int, default=None,
                    help="train features for the step plan (default: count them with the cached featurizer)")
    cf.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="resolve as for this device (default: the one here)")
    cf.set_defaults(func=_cmd_config)

    pn = sub.add_parser("plan", help="before a run: will it fit? memory per rank of each ZeRO/offload/checkpointing "
                        "setup, the largest micro-batch, the fastest setup that fits")
    add_recipe_arguments(pn, positional=True)
    what = pn.add_mutually_exclusive_group()
    what.add_argument("--model", default=None, help="a model name or directory instead of the recipe's")
    what.add_argument("--shape", default=None, help="a BERT shape LAYERSxHIDDENxHEADS instead, e.g. 24x1024x16")
    pn.add_argument("--cpu-memory", type=float, default=None, help="GiB of RAM per node (default: what is free here)")
    pn.add_argument("--gpus", type=int, default=0, help="GPUs per node (default 0: train on the CPU)")
    pn.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU")
    pn.add_argument("--nodes", type=int, default=1)
    pn.add_argument("--nvme", type=float, default=None, help="GiB free on the NVMe offload folder (default: unlimited)")
    pn.set_defaults(func=_cmd_plan)

    rc = sub.add_parser("recipes", help="the named recipes: model, SQuAD version, published F1/EM, GPUs")
    rc.add_argument("--json", action="store_true", help="as JSON (one object per recipe) instead of a table")
    rc.set_defaults(func=_cmd_recipes)

    ex = sub.add_parser("export", help="a Hugging Face model directory (with a model card) from any checkpoint")
    ex.add_argument("source", help="run directory, its checkpoints/ directory, or one step's checkpoint directory")
    which = ex.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="that step's checkpoint (default: the newest)")
    which.add_argument("--best", action="store_true", help="the best evaluation's checkpoint (train.keep_best)")
    ex.add_argument("--out", default=None, help="model directory to write (default: RUN_DIR/model-stepNNNNNNNN)")
    ex.add_argument("--onnx", action="store_true", help="also write model.onnx (BERT family; the onnx extra)")
    ex.add_argument("--push-to-hub", default=None, metavar="REPO", help="then upload it to this Hub repository")
    ex.set_defaults(func=_cmd_export)

    ak = sub.add_parser("ask", help="answer questions about a text with a trained model (one JSON line each)")
    _add_model_arguments(ak)
    ak.add_argument("--question", default=None, help="the question (with --context or --context-file)")
    ak.add_argument("--context", default=None, help="the text to find the answer in")
    ak.add_argument("--context-file", default=None, metavar="FILE", help="the text, from a UTF-8 file")
    ak.add_argument("--input", default=None, metavar="JSONL",
                    help="many questions: JSON lines of {\"question\", \"context\"[, \"id\"]} (- for stdin)")
    ak.add_argument("--top-k", type=int, default=1, help="answers per question, best first (default 1)")
    ak.set_defaults(func=_cmd_ask)

    sv = sub.add_parser("serve", help="a small web server to try a model: a page and a JSON API (the serve extra)")
    _add_model_arguments(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, logged)")
    sv.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="also answer requests sent to this host name (default: only the address served; * for any)")
    sv.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                    help="also answer pages from this origin, e.g. http://localhost:3000 (default: only its own page)")
    sv.set_defaults(func=_cmd_serve)

    ho = sub.add_parser("hosts", help="before a multi-host run: check every host of a DeepSpeed hostfile (ssh, "
                        "Python and versions, shared data and output, MASTER_ADDR and port); one line per problem")
    ho.add_argument("hostfile", help="DeepSpeed hostfile: one line per host, `NAME slots=N`")
    add_recipe_arguments(ho)
    ho.add_argument("--master-addr", "--master_addr", default=None,
                    help="the address rank 0 listens on (default: the hostfile's first host)")
    ho.add_argument("--master-port", "--master_port", type=int, default=29500, help="default 29500")
    ho.add_argument("--ssh-port", "--ssh_port", type=int, default=None, help="ssh port, as the launcher's --ssh_port")
    ho.add_argument("--launcher", default="pdsh", help="the launcher's --launcher (default pdsh: checked here)")
    ho.set_defaults(func=_cmd_hosts)

    pl = sub.add_parser("plot", help="PNG of a run's training loss and dev scores over steps (the plot extra)")
    pl.add_argument("run_dir", help="the run's output.dir")
    pl.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/training.png)")
    pl.add_argument("--title", default=None)
    pl.add_argument("--smooth", type=int, default=25, help="moving-average window for the loss (steps)")
    pl.set_defaults(func=_cmd_plot)

    from squad_ds.tune import search as tune

    tu = sub.add_parser("tune", help=tune.HELP)
    tune.add_arguments(tu)
    tu.set_defaults(func=tune.command)

    from squad_ds.search import command as search

    se = sub.add_parser("search", help=search.HELP)
    search.add_arguments(se)
    se.set_defaults(func=search.command)
    return p


def guide(parser: argparse.ArgumentParser) -> str:
    """What `squad-ds` alone prints: the sub-commands with their one-line help, and the commands to start with."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = "\n".join(f"  {c.dest:<12}{c.help}" for c in sub._choices_actions)
    starts = "\n".join(f"  {command:<24}{what}" for command, what in START)
    return (f"squad-ds {__version__}: {DESCRIPTION.split(';')[0]}.\n\ncommands:\n{commands}\n\n"
            f"start with:\n{starts}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATED:
        import importlib

        from squad_ds import options

        # Parsed before the trainer's heavy imports: --help and a mistyped option answer at once.
        args = {"train": options.train_parser, "predict": options.predict_parser}[argv[0]]().parse_args(argv[1:])
        if argv[0] == "train":
            from squad_ds import preempt

            preempt.install()  # before the trainer's heavy imports
        return importlib.import_module(_DELEGATED[argv[0]]).run_parsed(args)
    parser = build_parser()
    if not argv:
        emit_text(guide(parser))
        return 0
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from squad_ds.errors import run_main

    return run_main(f"squad-ds {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
