"""The training loop: forward → engine.backward → engine.step → log → evaluate → save.

Run as `squad-ds train …`, `deepspeed -m squad_ds.train …`, `torchrun -m squad_ds.train …` or under `srun`.
DeepSpeed owns accumulation, clipping, loss scaling and the LR schedule; this loop owns data order, evaluation,
checkpoints and preemption.
"""
from __future__ import annotations

# ruff: noqa: E402 - the signal handlers go in before the heavy imports (see preempt.py)
from squad_ds import preempt

if __name__ == "__main__":  # `python -m squad_ds.train` and the launchers; `squad-ds train` installed them already
    preempt.install()

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from squad_ds import checkpoint, distributed, resume, run_dir
from squad_ds.batching import BatchLoader, epoch_order, trim_policy
from squad_ds.config import Recipe, dump_recipe, load_recipe
from squad_ds.data_files import resolve_data_path
from squad_ds.engine import build_engine, default_ds_config_name, load_ds_config, resolve_ds_config
from squad_ds.effective import effective_document
from squad_ds.errors import run_main
from squad_ds.evaluate import evaluate
from squad_ds.flops import batch_flops, detect_peak_tflops
from squad_ds.logs import Throughput, format_step, log_main, progress, setup_logging
from squad_ds.modeling import unpadded
from squad_ds.modeling.factory import check_max_seq_length, load_qa_model, load_tokenizer
from squad_ds.modeling.heads import forward_keys, model_family, model_inputs
from squad_ds.modeling.sdpa import current_order as current_sdpa_order, sdpa_preference
from squad_ds.preprocess import load_features
from squad_ds.packing import is_packed

EXIT_REQUEUE = 75  # EX_TEMPFAIL: preempted, checkpoint saved; the SLURM script requeues on it


def build_arg_parser(prog: str = "squad-ds train") -> argparse.ArgumentParser:
    import deepspeed

    p = argparse.ArgumentParser(prog=prog, description="Fine-tune a QA model with DeepSpeed.")
    p.add_argument("--recipe", default=None, help="named recipe or YAML file (default: the embedded demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint of this run) or a path; "
                   "without it a run continues from output.dir's checkpoints when there are any")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output.dir that holds an earlier run (its checkpoints are removed)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    deepspeed.add_config_arguments(p)
    return p


class Preemption:
    """The signal flag (preempt.py), read at optimizer-step boundaries on all ranks together."""

    def __init__(self):
        self.flag = preempt.install()

    def agreed(self, step: int, every: int) -> bool:
        """Whether all ranks stop now. Alone, the flag is read every step; with several ranks the vote (a
        collective and a host sync) is taken every `every` steps."""
        if distributed.world_size() == 1:
            return self.flag.requested
        return step % max(1, every) == 0 and bool(distributed.all_reduce_max(int(self.flag.requested)))


def train_step(engine, batch: dict[str, torch.Tensor], family: str, config) -> torch.Tensor:
    """One micro-batch: forward, engine.backward, engine.step (DeepSpeed decides whether the step is an optimizer
    step). Returns the loss, detached and left on the device (no host sync)."""
    if is_packed(batch):
        loss = unpadded.qa_loss(engine(**unpadded.model_inputs(batch)), batch)
    else:
        loss = engine(**model_inputs(family, batch, train=True, config=config)).loss
    engine.backward(loss)
    engine.step()
    return loss.detach()


def run(args: argparse.Namespace) -> int:
    preempt = Preemption()  # first: a signal during the minute of start-up must not kill a rank unsaved
    distributed.setup_env()
    recipe = load_recipe(args.recipe, args.overrides)
    cuda = torch.cuda.is_available()
    world = int(os.environ["WORLD_SIZE"])
    ds_name = args.deepspeed_config or recipe.deepspeed_config or default_ds_config_name(cuda, world)
    ds_raw = load_ds_config(ds_name)
    # Validate the DeepSpeed/recipe combination before any data or model work.
    resolve_ds_config(ds_raw, recipe, world_size=world, num_features=1, cuda=cuda)
    distributed.init(cuda, recipe.distributed.timeout_s, recipe.distributed.rendezvous_timeout_s)
    setup_logging()
    device = torch.device("cuda", distributed.local_rank()) if cuda else torch.device("cpu")
    out = Path(recipe.output.dir)
    held = distributed.on_main(lambda: run_dir.lock(out))  # noqa: F841 - held open until the process ends
    resume_from = run_dir.resume_mode(args.resume, args.overwrite, out)
    if args.overwrite:
        distributed.on_main(lambda: run_dir.clear(out))
    torch.manual_seed(recipe.train.seed)
    np.random.seed(recipe.train.seed)

    check_max_seq_length(recipe.model.name_or_path, recipe.data.max_seq_length)
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path)
    train_path = resolve_data_path(recipe.data.train_file, "data.train_file")
    train_feats, _ = load_features(train_path, tokenizer, recipe.data, "train", recipe.data.max_train_examples)
    eval_feats = eval_set = None
    if recipe.data.eval_file:
        eval_feats, eval_set = load_features(resolve_data_path(recipe.data.eval_file), tokenizer, recipe.data, "eval",
                                             recipe.data.max_eval_examples)

    ds_cfg, plan = resolve_ds_config(ds_raw, recipe, world_size=distributed.world_size(),
                                     num_features=len(train_feats), cuda=cuda)
    model = load_qa_model(recipe.model.name_or_path, attn_implementation=recipe.model.attn_implementation)
    family = model_family(model.config)
    engine, _, _ = build_engine(model, ds_cfg, recipe)
    effective = effective_document(recipe, ds_cfg, ds_name, plan, len(train_feats))
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "effective_config.json").write_text(json.dumps(effective, indent=2) + "\n")
        log_main("effective config:\n%s\n%s", dump_recipe(recipe), json.dumps(ds_cfg, indent=2))

    ckpt_dir = out / "checkpoints"
    epoch, position = 0, 0
    found = checkpoint.find_resume(resume_from, ckpt_dir)
    layout = resume.layout(plan, len(train_feats))
    if found:
        where = found[0] / found[1]
        marker = checkpoint.marker(*found)
        if "recipe" in marker:  # checked before DeepSpeed loads anything (another world size would fail there)
            _log_changes(resume.check(marker["recipe"], marker["layout"], recipe.to_dict(), layout, where))
        state = checkpoint.load(engine, *found)
        if "recipe" not in marker:  # saved by a squad-ds that kept the settings in the client state only
            saved = {"world_size": marker.get("world_size"), **state.get("layout", {})}
            _log_changes(resume.check(state.get("recipe"), saved, recipe.to_dict(), layout, where))
        epoch, position = state["epoch"], state["position"]
    else:
        distributed.on_main(lambda: (out / "train_log.jsonl").unlink(missing_ok=True))  # a log of this run only

    with sdpa_preference(recipe.model.sdpa_backend):
        if cuda or recipe.model.sdpa_backend != "auto":
            log_main("SDPA backends in the order torch tries them: %s", ", ".join(current_sdpa_order()))
        metrics, preempted, saved = train_loop(engine, recipe, plan, train_feats, family, device, ckpt_dir, epoch,
                                               position, eval_feats, eval_set, out, preempt, layout)
    if preempted:
        return EXIT_REQUEUE
    if recipe.output.export:
        # The final checkpoint: saved by this run, or the one it resumed from when that was already the last step.
        src_dir, tag = (ckpt_dir, saved) if saved else found
        checkpoint.export_hf(engine, tokenizer, src_dir, tag, out / "model",
                             {"recipe": recipe.to_dict(), "step": engine.global_steps, "metrics": metrics})
    if distributed.is_main():
        final = {**(metrics or {}), "global_step": engine.global_steps, "output_dir": str(out)}
        print(json.dumps(final), flush=True)
    return 0


def _client_state(recipe: Recipe, epoch: int, position: int, layout: dict) -> dict:
    return {"epoch": epoch, "position": position, "seed": recipe.train.seed, "recipe": recipe.to_dict(),
            "layout": layout}


def _log_changes(changes: list[str]) -> None:
    if changes:
        log_main("resuming with changed settings: %s", "; ".join(changes))


def train_loop(engine, recipe: Recipe, plan, feats, family, device, ckpt_dir, epoch, position, eval_feats,
               eval_set, out, preempt: Preemption, layout: dict):
    """Train to plan.total_steps from (epoch, position); returns (final metrics, whether preempted, the tag of
    the last checkpoint saved or None)."""
    tr = recipe.train
    world, rank = distributed.world_size(), distributed.rank()
    cfg = engine.module.config
    keys = forward_keys(family, train=True, config=cfg)
    rates = Throughput(tr.peak_tflops or detect_peak_tflops(), world)
    trim = trim_policy(recipe.data, device.type == "cuda")
    # Grouping lengths only pays when batches are trimmed or packed; full-length batches keep the plain shuffle.
    lengths = feats.attention_mask.sum(1) if tr.group_by_length and trim.shortens else None
    # from_pretrained returns the model in eval mode: dropout must be on for every training micro-batch, from the
    # first (evaluation puts back the mode it found).
    engine.train()
    bar = progress(plan.total_steps, initial=engine.global_steps)
    pending: list[torch.Tensor] = []  # per-micro-batch losses since the last log line (no .item() per step)
    log_file = out / "train_log.jsonl"
    metrics = saved = None
    t0 = time.perf_counter()
    step_before = engine.global_steps
    done = step_before >= plan.total_steps
    try:
        while not done:
            order = epoch_order(len(feats), world, rank, tr.seed, epoch, lengths=lengths,
                                global_batch=plan.global_batch)
            loader = torch.utils.data.DataLoader(BatchLoader(feats, order, plan.micro_batch, keys, position, trim),
                                                 batch_size=None, shuffle=False, pin_memory=device.type == "cuda",
                                                 num_workers=2 if device.type == "cuda" else 0,
                                                 # its own generator: a DataLoader iterator draws a seed when it starts,
                                                 # which from the global RNG would shift dropout after a resume
                                                 generator=torch.Generator())
            batches_per_epoch = -(-len(order) // plan.micro_batch)
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                pending.append(train_step(engine, batch, family, cfg))
                position += 1
                rates.add(*batch_flops(cfg, batch))
                if engine.global_steps == step_before:
                    continue  # inside an accumulation window
                step = step_before = engine.global_steps
                bar.update(1)
                last = step >= plan.total_steps
                if tr.log_steps and (step % tr.log_steps == 0 or last):
                    _log_losses(pending, step, plan, engine, rates, log_file, bar)
                    pending = []
                if eval_feats is not None and tr.eval_steps and step % tr.eval_steps == 0 and not last:
                    metrics = evaluate(engine, eval_set, eval_feats, family, recipe.eval, device, out / f"eval-{step}",
                                       trim=trim)
                    _monitor_eval(engine, metrics)
                stop = preempt.agreed(step, tr.log_steps)
                if stop or last or (tr.save_steps and step % tr.save_steps == 0):
                    epoch_done = position >= batches_per_epoch
                    epoch_now, pos_now = (epoch + 1, 0) if epoch_done else (epoch, position)
                    saved = checkpoint.save(engine, ckpt_dir, step, _client_state(recipe, epoch_now, pos_now, layout),
                                            tr.keep_last)
                if stop:
                    log_main("preempted at step %d: checkpoint saved, exiting with %d for requeue", step, EXIT_REQUEUE)
                    bar.close()
                    return None, True, saved
                if last:
                    done = True
                    break
            else:  # the epoch ran out before the planned steps did
                epoch, position = epoch + 1, 0
    except BaseException:
        bar.close()  # its last line before the error's, not after it
        raise
    bar.close()
    if pending:
        _log_losses(pending, engine.global_steps, plan, engine, rates, log_file, bar)
    log_main("trained %d steps in %.1f s", engine.global_steps, time.perf_counter() - t0)
    if eval_feats is not None:
        metrics = evaluate(engine, eval_set, eval_feats, family, recipe.eval, device, out, trim=trim)
        _monitor_eval(engine, metrics)
    return metrics, False, saved


def _monitor_eval(engine, metrics: dict | None) -> None:
    """Eval scores next to DeepSpeed's own train loss/lr events (TensorBoard, CSV, … as the JSON enables)."""
    if metrics and engine.monitor.enabled and distributed.is_main():
        engine.monitor.write_events([(f"Eval/{k}", float(v), engine.global_samples) for k, v in metrics.items()
                                     if isinstance(v, (int, float))])


def _log_losses(pending, step, plan, engine, rates, log_file, bar) -> None:
    """One host sync per log interval: per-step losses averaged over ranks, appended to train_log.jsonl."""
    losses = torch.stack(pending).float()
    if distributed.world_size() > 1:
        losses = losses.to(engine.device)
        torch.distributed.all_reduce(losses)
        losses = losses / distributed.world_size()
    per_micro = losses.cpu().tolist()
    acc = plan.accumulation
    per_step = [sum(per_micro[i:i + acc]) / len(per_micro[i:i + acc]) for i in range(0, len(per_micro), acc)]
    first = step - len(per_step) + 1
    lr = engine.get_lr()[0]
    r = rates.measure()
    if distributed.is_main():
        with open(log_file, "a", encoding="utf-8") as f:
            for i, l in enumerate(per_step):
                f.write(json.dumps({"step": first + i, "loss": l}) + "\n")
        if engine.monitor.enabled:  # DeepSpeed logs the lr itself; the loss and throughput come from here
            events = [("Train/Samples/train_loss", l, (first + i) * plan.global_batch) for i, l in enumerate(per_step)]
            events += [(f"Train/Samples/{k}", v, step * plan.global_batch) for k, v in r.items()]
            engine.monitor.write_events(events)
        bar.set_postfix(loss=f"{per_step[-1]:.4f}", lr=f"{lr:.2e}", sps=f"{r['samples_per_s']:.1f}")
        log_main(format_step(step, plan.total_steps, per_step[-1], lr, r))


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_main("squad-ds train", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
