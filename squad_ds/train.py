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
    from squad_ds.options import train_parser as _parser

    _ARGS = _parser().parse_args()  # --help and a mistyped option answer before torch is imported

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from squad_ds import atomic, distributed, plot
from squad_ds.config import Recipe, dump_recipe
from squad_ds.data.batching import BatchLoader, epoch_order, trim_policy
from squad_ds.data.features import Features
from squad_ds.data.packing import is_packed
from squad_ds.data.squad import SquadDataset
from squad_ds.errors import ConfigError, TrainingDiverged, emit_result, run_main
from squad_ds.options import deepspeed_config_arg, train_parser
from squad_ds.logs import Throughput, format_step, log_main, progress, setup_logging
from squad_ds.modeling import unpadded
from squad_ds.modeling.heads import forward_keys, model_inputs
from squad_ds.modeling.sdpa import current_order as current_sdpa_order
from squad_ds.modeling.sdpa import sdpa_preference
from squad_ds.training import checkpoint, export, resume, run_dir, run_logs
from squad_ds.training.assemble import build_run, resolve_run
from squad_ds.training.ds_config import TrainPlan
from squad_ds.training.engine import scheduler_rate
from squad_ds.training.flops import batch_flops, detect_peak_tflops
from squad_ds.training.inference import evaluate

EXIT_REQUEUE = 75  # EX_TEMPFAIL: preempted, checkpoint saved; the SLURM script requeues on it


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
        loss = unpadded.qa_loss(engine(**unpadded.model_inputs(batch, config)), batch)
    else:
        loss = engine(**model_inputs(family, batch, train=True, config=config)).loss
    engine.backward(loss)
    engine.step()
    return loss.detach()


def run(args: argparse.Namespace) -> int:
    preemption = Preemption()  # first: a signal during the minute of start-up must not kill a rank unsaved
    distributed.setup_env()
    cuda = torch.cuda.is_available()
    spec = resolve_run(args.recipe, args.overrides, deepspeed_config_arg(args),
                       world_size=int(os.environ["WORLD_SIZE"]), cuda=cuda, ds_overrides=args.ds_overrides)
    recipe = spec.recipe
    if args.push_to_hub:  # found out now, not after hours of training
        if recipe.output.export_from is None:
            raise ConfigError(f"--push-to-hub {args.push_to_hub}: output.export is false: there would be no model")
        export.check_can_push(args.push_to_hub)
    distributed.init(cuda, recipe.distributed.timeout_s, recipe.distributed.rendezvous_timeout_s)
    setup_logging()
    if spec.ds_reason:
        log_main("DeepSpeed config %s: %s", spec.ds_name, spec.ds_reason)
    if distributed.world_size() > 1:
        log_main("%d ranks: %s", distributed.world_size(),
                 ", ".join(f"{r} on {h}" for r, h in enumerate(distributed.hosts_of_ranks())))
    device = distributed.device(cuda)
    out = Path(recipe.output.dir)
    held, resume_from = run_dir.prepare(  # noqa: F841 - the lock is held open until the process ends
        out, args.resume, args.overwrite, main=distributed.is_main(), export_to=recipe.output.export_from is not None,
        monitor=run_dir.ds_writes_monitor(spec.plan(1)[0], out))
    torch.manual_seed(recipe.train.seed)
    np.random.seed(recipe.train.seed)

    r = build_run(spec)
    engine = r.engine
    distributed.on_main(lambda: out.mkdir(parents=True, exist_ok=True))
    log_main("effective config:\n%s\n%s", dump_recipe(recipe), json.dumps(r.ds_config, indent=2))

    loop = Loop(engine, recipe, r.plan, r.train_features, r.family, device, out, r.eval_features, r.eval_set,
                resume.layout(r.plan, len(r.train_features)), resume.deepspeed_settings(r.ds_config))
    found = checkpoint.find_resume(resume_from, loop.ckpt_dir)
    state = _resume(loop, found) if found else LoopState()
    if distributed.is_main():  # after the resume check: a refused resume leaves the record of the saved run
        (out / "effective_config.json").write_text(json.dumps(r.effective_document(), indent=2) + "\n")
    if not found:
        distributed.on_main(lambda: (out / "train_log.jsonl").unlink(missing_ok=True))  # a log of this run only
    else:  # steps logged after the checkpoint (then killed) are trained and logged again: one line per step
        distributed.on_main(lambda: run_logs.cut_train_log(out / "train_log.jsonl", engine.global_steps))
        _tidy_monitor(engine, upto=engine.global_samples)

    with sdpa_preference(recipe.model.sdpa_backend):
        if cuda or recipe.model.sdpa_backend != "auto":
            log_main("SDPA backends in the order torch tries them: %s", ", ".join(current_sdpa_order()))
        train_loop(loop, state, preemption)
    _tidy_monitor(engine)
    if state.preempted:
        return EXIT_REQUEUE
    exported = _export(loop, state, found, r.tokenizer)
    if distributed.is_main():
        if exported and args.push_to_hub:
            exported["pushed"] = export.push_to_hub(Path(exported["dir"]), args.push_to_hub)
        _plot(out)
        final = {**(state.metrics or {}), "global_step": engine.global_steps, "output_dir": str(out)}
        if state.best and recipe.tracks_best:
            final["best"] = {"step": state.best["step"], **state.best["metrics"]}
        if state.stopped_early:
            final["stopped_early"] = True
        if exported:
            final["exported"] = exported
        emit_result(final)
    return 0


def _tidy_monitor(engine, upto: int | None = None) -> None:
    """DeepSpeed's CSV monitor files (report_to: csv) as one series each: cut back to `upto` samples on resume,
    its first column named "samples" (run_logs.tidy_monitor_dir)."""
    csv_monitor = getattr(engine.monitor, "csv_monitor", None)  # rank 0's only
    if csv_monitor is None or not csv_monitor.log_dir:
        return
    stems = run_logs.tidy_monitor_dir(Path(csv_monitor.log_dir), upto)
    # DeepSpeed writes a file's header the first time its process writes to it; these have theirs.
    csv_monitor.filenames.extend(s for s in stems if s not in csv_monitor.filenames)


def _plot(out: Path) -> None:
    """OUTPUT/training.png when matplotlib is installed; a plot never fails a finished run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    try:
        run_dir.claim(out, ["training.png"])
        log_main("plotted the run: %s", plot.plot(out, out / "training.png"))
    except Exception as e:  # noqa: BLE001 - a picture is not worth a failed run
        log_main("could not plot the run (%s: %s)", type(e).__name__, e)


def _export(loop: Loop, state: LoopState, found: tuple[Path, str] | None, tokenizer) -> dict | None:
    """OUTPUT/model from the last checkpoint or the best evaluation's (output.export); what was exported."""
    which = loop.recipe.output.export_from
    if which is None:
        return None
    if which == "best" and state.best:
        src_dir, tag, step, metrics = loop.ckpt_dir, state.best["tag"], state.best["step"], state.best["metrics"]
    else:
        # The final checkpoint: saved by this run, or the one it resumed from when that was already the last step.
        src_dir, tag = (loop.ckpt_dir, state.saved) if state.saved else found
        step, metrics = loop.engine.global_steps, state.metrics
    record = {"recipe": loop.recipe.to_dict(), "step": step, "metrics": metrics, "export": which,
              "plan": {**loop.plan.__dict__, "global_batch": loop.plan.global_batch}}
    export.export_hf(loop.engine.module, tokenizer, src_dir, tag, loop.out / "model", record)
    return {"dir": str(loop.out / "model"), "step": step, **(metrics or {})}


@dataclass
class Loop:
    """What the training loop works with and never changes."""
    engine: Any
    recipe: Recipe
    plan: TrainPlan
    features: Features
    family: str
    device: torch.device
    out: Path
    eval_features: Features | None = None
    eval_set: SquadDataset | None = None
    layout: dict = field(default_factory=dict)  # the data layout a checkpoint records (resume.layout)
    deepspeed: dict = field(default_factory=dict)  # the DeepSpeed settings it records (resume.deepspeed_settings)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


@dataclass
class LoopState:
    """Where the loop is. `epoch` and `position` (micro-batches of that epoch drawn) are what a checkpoint records;
    the rest is what the run reports: the last evaluation, the last checkpoint saved, whether it was preempted."""
    epoch: int = 0
    position: int = 0
    batches_per_epoch: int = 0
    pending: list[torch.Tensor] = field(default_factory=list)  # losses since the last log line (no .item() per step)
    metrics: dict | None = None
    saved: str | None = None
    preempted: bool = False
    best: dict | None = None  # {"step", "tag", "value", "metrics"} of the best evaluation (train.metric_for_best)
    since_best: int = 0  # evaluations since the best one
    stopped_early: bool = False

    def track(self, step: int, metrics: dict | None, metric: str) -> None:
        """Record an evaluation at `step`: is it the best so far?"""
        self.metrics = metrics
        if not metrics:
            return
        if metric not in metrics:
            raise ConfigError(f"train.metric_for_best={metric}: the evaluation reports {', '.join(metrics)}")
        if self.best is None or metrics[metric] > self.best["value"]:
            self.best = {"step": step, "tag": checkpoint.tag_for(step), "value": metrics[metric], "metrics": metrics}
            self.since_best = 0
        else:
            self.since_best += 1

    def resume_point(self) -> tuple[int, int]:
        """(epoch, position) to continue from: an epoch drawn to its end continues at the next one's start."""
        if self.position >= self.batches_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.position


def _resume(loop: Loop, found: tuple[Path, str]) -> LoopState:
    """Load checkpoint `found` into the engine once its saved settings are checked against this run's."""
    where = found[0] / found[1]
    recipe = loop.recipe.to_dict()
    marker = checkpoint.marker(*found)
    saved_ds = marker.get("deepspeed")
    if "recipe" in marker:  # checked before DeepSpeed loads anything (another world size would fail there)
        _log_changes(resume.check(marker["recipe"], marker["layout"], recipe, loop.layout, where, saved_ds,
                                  loop.deepspeed))
    client = checkpoint.load(loop.engine, *found)
    if "recipe" not in marker:  # saved by a squad-ds that kept the settings in the client state only
        saved = {"world_size": marker.get("world_size"), **client.get("layout", {})}
        _log_changes(resume.check(client.get("recipe"), saved, recipe, loop.layout, where))
    if resume.replanned(saved_ds, loop.deepspeed):
        _log_replanned(saved_ds["scheduler"], loop.deepspeed["scheduler"], marker.get("step", 0))
    best = client.get("best")
    if best and not (loop.ckpt_dir / best["tag"] / checkpoint.MARKER).is_file():
        best = None  # saved before keep_best was on, and pruned since: the best is sought afresh
    return LoopState(epoch=client["epoch"], position=client["position"], best=best,
                     since_best=client.get("since_best", 0), stopped_early=bool(client.get("stopped_early")),
                     metrics=client.get("metrics"))


def _client_state(loop: Loop, state: LoopState) -> dict:
    epoch, position = state.resume_point()
    return {"epoch": epoch, "position": position, "seed": loop.recipe.train.seed, "recipe": loop.recipe.to_dict(),
            "layout": loop.layout, "deepspeed": loop.deepspeed, "best": state.best, "since_best": state.since_best,
            "stopped_early": state.stopped_early, "metrics": state.metrics if state.stopped_early else None}


def _log_replanned(saved: dict, now: dict, step: int) -> None:
    """Say what a changed train.max_steps / train.epochs does to the learning rate of a resumed run."""
    a, b = saved["params"], now["params"]
    log_main(
        "the learning-rate schedule is re-planned (train.max_steps or train.epochs changed): %s total steps "
        "(saved plan: %s), warmup %s (saved plan: %s): step %d trains at lr %.3e where the saved plan had %.3e. "
        "To keep the saved schedule, resume with the settings it was saved with",
        b.get("total_num_steps", "unbounded"), a.get("total_num_steps", "unbounded"), b["warmup_num_steps"],
        a["warmup_num_steps"], step + 1, scheduler_rate(now, step), scheduler_rate(saved, step))


def _log_changes(changes: list[str]) -> None:
    if changes:
        log_main("resuming with changed settings: %s", "; ".join(changes))


def micro_batches(loop: Loop, state: LoopState, trim) -> Iterator[dict[str, torch.Tensor]]:
    """Training micro-batches on the device, in the data order of (seed, epoch), from (state.epoch, state.position)
    on and across epochs; state.position counts those drawn."""
    tr, cuda = loop.recipe.train, loop.device.type == "cuda"
    world, rank = distributed.world_size(), distributed.rank()
    keys = forward_keys(loop.family, train=True, config=loop.engine.module.config)
    # Grouping lengths only pays when batches are trimmed or packed; full-length batches keep the plain shuffle.
    lengths = loop.features.attention_mask.sum(1) if tr.group_by_length and trim.shortens else None
    while True:
        order = epoch_order(len(loop.features), world, rank, tr.seed, state.epoch, lengths=lengths,
                            global_batch=loop.plan.global_batch)
        state.batches_per_epoch = -(-len(order) // loop.plan.micro_batch)
        batches = BatchLoader(loop.features, order, loop.plan.micro_batch, keys, state.position, trim)
        # Its own generator: a DataLoader iterator draws a seed when it starts, which from the global RNG would
        # shift dropout after a resume.
        for batch in torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, pin_memory=cuda,
                                                 num_workers=2 if cuda else 0, generator=torch.Generator()):
            state.position += 1
            yield {k: v.to(loop.device, non_blocking=True) for k, v in batch.items()}
        state.epoch, state.position = state.epoch + 1, 0


def optimizer_step(loop: Loop, batches: Iterator[dict], state: LoopState, rates: Throughput) -> int:
    """Micro-batches until DeepSpeed takes an optimizer step (it owns accumulation, clipping and the schedule);
    returns the new step number."""
    engine, config = loop.engine, loop.engine.module.config
    before = engine.global_steps
    while engine.global_steps == before:
        batch = next(batches)
        state.pending.append(train_step(engine, batch, loop.family, config))
        rates.add(*batch_flops(config, batch))
    return engine.global_steps


def train_loop(loop: Loop, state: LoopState, preemption: Preemption) -> LoopState:
    """Train from `state` to plan.total_steps, one optimizer step per iteration; then evaluate. Stops early, with a
    checkpoint, when the ranks agree on a preemption signal (state.preempted)."""
    engine, tr, plan = loop.engine, loop.recipe.train, loop.plan
    trim = trim_policy(loop.recipe.data, loop.device.type == "cuda")
    rates = Throughput(tr.peak_tflops or detect_peak_tflops(), distributed.world_size())
    batches = micro_batches(loop, state, trim)
    # from_pretrained returns the model in eval mode: dropout must be on for every training micro-batch, from the
    # first (evaluation puts back the mode it found).
    engine.train()
    bar = progress(plan.total_steps, initial=engine.global_steps)
    log_file = loop.out / "train_log.jsonl"
    t0 = time.perf_counter()
    try:
        while engine.global_steps < plan.total_steps and not state.stopped_early:
            step = optimizer_step(loop, batches, state, rates)
            bar.update(1)
            last = step >= plan.total_steps
            if tr.log_steps and (step % tr.log_steps == 0 or last):
                _log_losses(state.pending, step, plan, engine, rates, log_file, bar)
                state.pending = []
            evaluated = loop.eval_features is not None and tr.eval_steps and step % tr.eval_steps == 0 and not last
            if evaluated:
                state.track(step, _evaluate(loop, trim, loop.out / f"eval-{step}"), tr.metric_for_best)
            early = bool(evaluated and tr.early_stopping_patience and state.since_best >= tr.early_stopping_patience)
            state.stopped_early = early  # recorded by the checkpoint below: a resumed run does not train on
            stop = preemption.agreed(step, tr.log_steps)
            if (stop or last or early or (tr.save_steps and step % tr.save_steps == 0)
                    or (evaluated and loop.recipe.tracks_best)):
                if state.pending:  # logged first: a diverged step is never saved (nor prunes a good one), and the
                    # log holds every step a checkpoint holds (a resume cuts it back to the checkpoint, never past)
                    _log_losses(state.pending, step, plan, engine, rates, log_file, bar)
                    state.pending = []
                state.saved = checkpoint.save(engine, loop.ckpt_dir, step, _client_state(loop, state), tr.keep_last,
                                              keep=[state.best["tag"]] if state.best else [])
            if stop:
                log_main("preempted at step %d: checkpoint saved, exiting with %d for requeue", step, EXIT_REQUEUE)
                state.preempted = True
                return state
            if early:
                log_main("early stopping at step %d: %d evaluations without a better %s than %.4f (step %d)", step,
                         state.since_best, tr.metric_for_best, state.best["value"], state.best["step"])
                break
    finally:
        bar.close()  # its last line before any error's, not after it
    if state.pending:
        _log_losses(state.pending, engine.global_steps, plan, engine, rates, log_file, bar)
        state.pending = []
    log_main("trained %d steps in %.1f s", engine.global_steps, time.perf_counter() - t0)
    if loop.eval_features is not None and not state.stopped_early:
        state.track(engine.global_steps, _evaluate(loop, trim, loop.out), tr.metric_for_best)
    elif state.stopped_early and state.metrics and distributed.is_main():  # the run's result: its last evaluation
        run_dir.claim(loop.out, ["eval_results.json"])
        atomic.write_json(loop.out / "eval_results.json",
                          {**state.metrics, "global_step": engine.global_steps, "stopped_early": True})
    return state


def _evaluate(loop: Loop, trim, out_dir: Path) -> dict:
    if distributed.is_main():
        run_dir.before_evaluation(loop.out, out_dir, loop.eval_set.version)
    metrics = evaluate(loop.engine, loop.eval_set, loop.eval_features, loop.family, loop.recipe.eval, loop.device,
                       out_dir, trim=trim)
    _monitor_eval(loop.engine, metrics)
    return metrics


def _monitor_eval(engine, metrics: dict | None) -> None:
    """Eval scores next to DeepSpeed's own train loss/lr events (TensorBoard, CSV, … as the JSON enables)."""
    if metrics and engine.monitor.enabled and distributed.is_main():
        engine.monitor.write_events([(f"Eval/{k}", float(v), engine.global_samples) for k, v in metrics.items()
                                     if isinstance(v, (int, float))])


def _reduced_losses(pending, engine) -> list[float]:
    """The pending micro-batch losses averaged over ranks (one host sync): every rank gets the same values."""
    losses = torch.stack(pending).float()
    if distributed.world_size() > 1:
        losses = losses.to(engine.device)
        torch.distributed.all_reduce(losses)
        losses = losses / distributed.world_size()
    return losses.cpu().tolist()


def _check_finite(per_micro: list[float], first_step: int, accumulation: int) -> None:
    """Stop, on every rank alike, at a NaN or infinite loss: before it is logged as a number or saved."""
    bad = next((i for i, v in enumerate(per_micro) if not math.isfinite(v)), None)
    if bad is not None:
        step = first_step + bad // accumulation
        raise TrainingDiverged(f"the training loss is {per_micro[bad]} at step {step}: stopping before "
                               "anything more is saved (the checkpoints already complete are kept). Lower train.lr "
                               "or check the starting weights and the data, then resume from the last checkpoint")


def _log_losses(pending, step, plan, engine, rates, log_file, bar) -> None:
    """One host sync per log interval: per-step losses averaged over ranks, appended to train_log.jsonl."""
    per_micro = _reduced_losses(pending, engine)
    acc = plan.accumulation
    per_step = [sum(per_micro[i:i + acc]) / len(per_micro[i:i + acc]) for i in range(0, len(per_micro), acc)]
    first = step - len(per_step) + 1
    _check_finite(per_micro, first, acc)
    lr = engine.get_lr()[0]
    r = rates.measure()
    if distributed.is_main():
        with open(log_file, "a", encoding="utf-8") as f:
            for i, loss in enumerate(per_step):
                f.write(json.dumps({"step": first + i, "loss": loss}) + "\n")
        if engine.monitor.enabled:  # DeepSpeed logs the lr itself; the loss and throughput come from here
            events = [("Train/Samples/train_loss", loss, (first + i) * plan.global_batch)
                      for i, loss in enumerate(per_step)]
            events += [(f"Train/Samples/{k}", v, step * plan.global_batch) for k, v in r.items()]
            engine.monitor.write_events(events)
        bar.set_postfix(loss=f"{per_step[-1]:.4f}", lr=f"{lr:.2e}", sps=f"{r['samples_per_s']:.1f}")
        log_main(format_step(step, plan.total_steps, per_step[-1], lr, r))


def main(argv: list[str] | None = None) -> int:
    return run_parsed(train_parser().parse_args(sys.argv[1:] if argv is None else argv))


def run_parsed(args: argparse.Namespace) -> int:
    return run_main("squad-ds train", lambda: distributed.lost_rank_as_error(lambda: run(args)))


if __name__ == "__main__":
    sys.exit(run_parsed(_ARGS))
