"""`squad-ds predict`: a trained model directory + SQuAD JSON → predictions (scored when answers exist).

Runs single-process or under a launcher (each rank predicts its slice; see evaluate.py). No optimizer or ZeRO is
involved, so it loads the exported HF directory directly.
"""
from __future__ import annotations

# ruff: noqa: E402 - run as a module, the arguments are parsed before the heavy imports
if __name__ == "__main__":  # `python -m squad_ds.predict` and the launchers
    from squad_ds.options import predict_parser as _parser

    _ARGS = _parser().parse_args()  # --help and a mistyped option answer before torch is imported

import argparse
import sys
from pathlib import Path

import torch

from squad_ds import distributed
from squad_ds.model_record import recipe_for_model
from squad_ds.data.batching import trim_policy
from squad_ds.data.files import resolve_data_path
from squad_ds.data.preprocess import load_features
from squad_ds.errors import ConfigError, emit_result, run_main
from squad_ds.logs import setup_logging
from squad_ds.options import predict_parser
from squad_ds.modeling.factory import check_max_seq_length, load_qa_model, load_tokenizer
from squad_ds.modeling.heads import model_family
from squad_ds.modeling.sdpa import sdpa_preference
from squad_ds.training.engine import prepare_model
from squad_ds.training.inference import evaluate


# What marks a folder as a training run's or a model's: predict's files there would replace the run's own results
# (eval_results.json, predictions.json) or mix into the model.
_NOT_PREDICTIONS = ("train_log.jsonl", "checkpoints", "effective_config.json", "config.json", "squad_ds.json")


def check_out_dir(out_dir: Path) -> Path:
    """Refuse an --out-dir that is a file, a training run's folder or a model folder (before the model loads)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir}: exists and is not a directory (choose another path)")
    mark = next((n for n in _NOT_PREDICTIONS if (out_dir / n).exists()), None)
    if mark is not None:
        raise ConfigError(f"--out-dir {out_dir}: holds {mark}, so it is a training run's or a model's folder: "
                          "predictions there would replace its own files (choose another path, e.g. a new folder "
                          "inside it)")
    return out_dir


def run(args: argparse.Namespace) -> int:
    out_dir = check_out_dir(Path(args.out_dir)) if args.out_dir else Path(args.model) / "predictions"
    recipe = recipe_for_model(args.model, args.recipe, args.overrides)
    cuda = torch.cuda.is_available()
    distributed.init(cuda, recipe.distributed.timeout_s, recipe.distributed.rendezvous_timeout_s)
    setup_logging()
    device = distributed.device(cuda)
    check_max_seq_length(args.model, recipe.data.max_seq_length)
    tokenizer = load_tokenizer(args.model)
    feats, dataset = load_features(resolve_data_path(args.data), tokenizer, recipe.data, "eval",
                                   recipe.data.max_eval_examples)
    torch.manual_seed(recipe.train.seed)  # a checkpoint without a QA head gets a reproducible random one
    model = load_qa_model(args.model, attn_implementation=recipe.model.attn_implementation).to(device)
    prepare_model(model, recipe, train=False)
    trim = trim_policy(recipe.data, cuda)
    with sdpa_preference(recipe.model.sdpa_backend):
        metrics = evaluate(model, dataset, feats, model_family(model.config), recipe.eval, device, out_dir,
                           trim=trim)
    if distributed.is_main():
        emit_result({**(metrics or {}), "predictions": str(out_dir / "predictions.json")})
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_parsed(predict_parser().parse_args(sys.argv[1:] if argv is None else argv))


def run_parsed(args: argparse.Namespace) -> int:
    return run_main("squad-ds predict", lambda: run(args))


if __name__ == "__main__":
    sys.exit(run_parsed(_ARGS))
