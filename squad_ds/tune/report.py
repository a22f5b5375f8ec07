"""`squad-ds tune`'s human-readable report (trials.md): every trial, the largest micro-batch per combination, the
winner and the command that trains with it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from squad_ds.tune.search import Search, Trial


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    return ("yes" if v else "no") if isinstance(v, bool) else str(v)


def _by_combo(trials: list[Trial]) -> dict[str, list[Trial]]:
    out: dict[str, list[Trial]] = {}
    for t in trials:
        if not t.variant:  # variants re-run the winner's combination; the micro-batch search is the base's
            out.setdefault(t.combo.label, []).append(t)
    return out


def trials_markdown(s: Search, winner: Trial | None, command: str | None) -> str:
    dev = "CUDA" if s.cuda else "CPU"
    mem = "torch.cuda.max_memory_allocated" if s.cuda else "ru_maxrss"
    head = (f"Device: {dev} × {s.world}; global batch {s.global_batch} kept; base DeepSpeed config "
            f"`{s.base_ds_name}`; samples/s from the median optimizer step; peak memory: {mem}, max over ranks.")
    lines = [f"# squad-ds tune: {s.recipe_name or 'demo'}", "", head, ""]
    cols = ["stage", "offload", "ckpt", "micro", "accum", "variant", "samples/s", "peak mem GB", "status", "s",
            "note"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for t in s.trials:
        mark = " **(best)**" if t is winner else ""
        row = [t.stage, t.offload, t.ckpt, t.micro, t.accum, t.variant or "–", t.samples_per_s, t.peak_mem_gb,
               t.status + mark, t.seconds, t.note.replace("|", "/")]
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    lines += ["", "Largest micro-batch that fits, per combination:", ""]
    per_rank = s.global_batch // s.world
    for label, rows in _by_combo(s.trials).items():
        fit = [t.micro for t in rows if t.status == "fits"]
        stop = next((t for t in rows if t.status != "fits"), None)
        if stop is None:
            why = f"every candidate fits (the global batch allows micro ≤ {per_rank} per rank)"
        elif stop.status == "skipped":
            why = stop.note
        else:
            why = f"micro {stop.micro}: {stop.status}"
        lines.append(f"- {label}: {max(fit) if fit else 'none'} — {why}")
    lines.append("")
    if winner:
        best_line = (f"Best: ZeRO {winner.stage}, offload {_cell(winner.offload)}, activation checkpointing "
                     f"{_cell(winner.ckpt)}, micro {winner.micro} × accum {winner.accum} × world {s.world}"
                     f"{', variant ' + winner.variant if winner.variant else ''}: {winner.samples_per_s} samples/s "
                     "(median step).")
        lines += [best_line, "", "Train with it:", "", f"    {command}", ""]
    else:
        lines += ["No trial fitted: nothing written to ds_config.tuned.json.", ""]
    return "\n".join(lines)
