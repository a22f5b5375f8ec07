"""docs/RESULTS.md's sections, one function each: records in, Markdown lines out (bench/report.py assembles them)."""
from __future__ import annotations

from pathlib import Path

from records import GIB, MEMORY_PLOT, NR, duration, machine_label, mean, memory_machine, meta, num, of, pct, \
    rows_table, table, val

SIDE_NAMES = {"squad-ds": "squad-ds, `cpu_fp32`", "squad-ds-bf16": "squad-ds, `cpu_bf16_autocast`",
              "squad-ds-default": "squad-ds, no DeepSpeed config named (the CPU's measured choice)",
              "squad-ds-sdpa": "squad-ds, `model.fused_dropout=false`",
              "squad-ds-compile": "squad-ds, `train.compile=true`",
              "hf": "Trainer, run_qa's recipe (fp32)", "hf-bf16": "Trainer, `bf16=True`"}
TRAINER = {"hf": "the Trainer (fp32)", "hf-bf16": "the Trainer (`bf16=True`)",
           "hf-ds": "the Trainer + DeepSpeed (ZeRO-3, CPU offload)",
           "hf-ds-bf16": "the Trainer + DeepSpeed (ZeRO-3, CPU offload, `bf16=True`)",
           "hf-ds-nvme": "the Trainer + DeepSpeed (ZeRO-3, NVMe offload)",
           "hf-ds-nvme-bf16": "the Trainer + DeepSpeed (ZeRO-3, NVMe offload, `bf16=True`)"}


def setup_name(r: dict) -> str:
    """A memory_fit row's setup as the page names it."""
    side = r.get("side") or ("hf" if r["ds_config"] in TRAINER else "squad-ds")
    if side == "squad-ds":
        return f"squad-ds `{r['ds_config']}`"
    name = TRAINER.get(r["ds_config"], f"the Trainer ({side})")
    return name[0].upper() + name[1:]


def capacity(runs: list[dict]) -> list[dict]:
    """Per ceiling and setup (micro-batch 1, no activation checkpointing): the largest model that completed under it
    and the smallest the kernel killed, largest first."""
    by: dict[tuple, dict] = {}
    for r in runs:
        if not r.get("ceiling_bytes") or r["micro"] != 1 or r["activation_checkpointing"]:
            continue
        c = by.setdefault((r["ceiling_bytes"], setup_name(r)), {"ceiling": r["ceiling_bytes"], "setup": setup_name(r),
                                                                "fit": None, "killed": None})
        if r["rc"] == 0 and (c["fit"] is None or r["params"] > c["fit"]["params"]):
            c["fit"] = r
        elif r["rc"] != 0 and r.get("oom_killed") and (c["killed"] is None or r["params"] < c["killed"]["params"]):
            c["killed"] = r
    return sorted(by.values(), key=lambda c: (-c["ceiling"], -(c["fit"]["params"] if c["fit"] else 0)))


def micro_capacity(runs: list[dict], shape: str) -> list[dict]:
    """Per ceiling, setup and checkpointing, for one shape: the largest micro-batch that completed under the ceiling
    and the smallest the kernel killed (where a micro-batch above 1 was tried, or one was killed)."""
    by: dict[tuple, dict] = {}
    for r in runs:
        if r["shape"] != shape or not r.get("ceiling_bytes"):
            continue
        key = (r["ceiling_bytes"], setup_name(r), bool(r["activation_checkpointing"]))
        c = by.setdefault(key, {"ceiling": key[0], "setup": key[1], "ckpt": key[2], "fit": None, "killed": None,
                                "tried": set()})
        c["tried"].add(r["micro"])
        if r["rc"] == 0 and (c["fit"] is None or r["micro"] > c["fit"]["micro"]):
            c["fit"] = r
        elif r["rc"] != 0 and r.get("oom_killed") and (c["killed"] is None or r["micro"] < c["killed"]["micro"]):
            c["killed"] = r
    return sorted((c for c in by.values() if max(c["tried"]) > 1 or c["killed"]),
                  key=lambda c: (-c["ceiling"], -(c["fit"]["micro"] if c["fit"] else 0)))


def trainer_largest(cap: list[dict], ceiling: int) -> dict | None:
    """The largest model the plain Trainer (fp32 or bf16=True) completed under `ceiling`."""
    fits = [c["fit"] for c in cap if c["ceiling"] == ceiling and c["fit"] and c["fit"].get("side", "hf") in TRAINER
            and not c["fit"]["ds_config"].startswith("hf-ds")]
    return max(fits, key=lambda r: r["params"], default=None)
CAVEATS = {"roberta_large_squad2": "with an answerability classifier squad-ds lacks",
           "electra_large_squad2": "with layer-wise lr decay and an answerability head squad-ds lacks",
           "deberta_v3_base_squad2": "training settings not published",
           "deberta_v3_large_squad2": "training settings not published"}


def train_measured(r: dict) -> str:
    f = r["figures"]
    if "f1" not in f:
        return f"not scored ({r['date']}, {machine_label(r['machine'])})"
    took = duration(f["wall_s"]) if "wall_s" in f else f"{val(f['train_h'])} h of training"
    precision = r["config"]["precision"].split(" (")[0].replace("cpu_bf16_autocast", "bf16 autocast")
    return (f"**{val(f['f1'])} / {val(f['exact_match'])}** in {took} "
            f"({machine_label(r['machine'])}, {precision.replace('cpu_fp32', 'fp32')}, {r['date']})")


def recipes(records: list[dict]) -> list[str]:
    from squad_ds.config import list_recipes, load_recipe

    runs = of(records, "train")
    rows = []
    for name in list_recipes():
        if name.endswith("_large_batch") or name == "tiny":
            continue
        rec = load_recipe(name)
        pub = "—"
        if rec.expected:
            pub = " / ".join(val(rec.expected[k]) for k in ("f1", "exact_match") if k in rec.expected)
            pub += f" ({CAVEATS[name]})" if name in CAVEATS else ""
        mine = [r for r in runs if r["config"].get("recipe") == name]
        measured = "; ".join(train_measured(r) for r in mine) or "not yet run"
        rows.append([f"`{name}`", rec.model.name_or_path, rec.data.version or "1.1 sample", pub, measured])
    out = ["## Recipes: published scores and measured ones", "",
           "Published targets are the recipes' `expected` scores, from the sources each recipe cites "
           "([RECIPES.md](RECIPES.md)); measured: dev F1 / EM of `squad-ds train` (the demo: on the shipped dev "
           "sample's 401 questions).", "",
           *table(["recipe", "model", "SQuAD", "published F1 / EM", "measured F1 / EM"], rows), ""]
    for r in runs:
        out.append(f"- `{r['key']}`: {meta(r)}" + (f" {r['note']}" if r["note"] else ""))
        if r["figures"].get("evals"):
            steps = ", ".join(f"step {e['step']:,} ({num(e['epochs'])} epochs) {num(e['f1'])} / {num(e['exact_match'])}"
                              for e in r["figures"]["evals"])
            out.append(f"  Scores over the run (F1 / EM): {steps}.")
        if r["figures"].get("plot"):
            plot = Path(r["figures"]["plot"]).relative_to("docs")
            out += ["", f"  ![{r['key']}: loss and dev scores over steps]({plot})"]
    return out + [""]


def speed(records: list[dict]) -> list[str]:
    out = ["## Training speed against the Hugging Face Trainer", "",
           "`bench/speed_parity.py`: the same model, windows, batch and schedule through `squad-ds train` and "
           "through the `Trainer` as `run_qa.py` uses it, each side in its own process, sides interleaved over "
           "repeats. Samples/s: windows ÷ the training loop's seconds (repeats in brackets); ratios: the median of "
           "same-repeat ratios (pairs in brackets). Model FLOP/s count every window at its own length; MFU is over "
           "the best 4096³ matmul rate measured in the same run. Sides as `--sides` names them: `squad-ds` (fp32), "
           "`squad-ds-bf16` (bf16 autocast), `squad-ds-sdpa` (torch's dropout), `squad-ds-compile`, `hf` (the Trainer "
           "with run_qa's recipe), `hf-bf16` (with `bf16=True`); the machine's default squad-ds side is marked.", ""]
    for r in of(records, "speed_parity"):
        f, c = r["figures"], r["config"]
        shape = r["key"].split(" [", 1)[1].rstrip("]") if " [" in r["key"] else ""
        tried = [*f["sides"], *(k for k in f.get("did_not_finish", {}) if k not in f["sides"])]
        out += [f"### {machine_label(r['machine'])}: {', '.join(tried)}" + (f" ({shape})" if shape else ""), "",
                f"{c['model']}, {c['work']}.", ""]
        rows = []
        for side, v in f["sides"].items():
            name = SIDE_NAMES.get(side, side) + (" **(default here)**" if side == c.get("default") else "")
            reps = v.get("samples_per_s_repeats")
            reps = f" ({', '.join(num(x) for x in reps)})" if reps else ""
            rows.append([name, f"{num(v['samples_per_s'])}{reps}", num(v.get("s_per_step")),
                         f"{num(v['peak_rss_gib'])} GiB" if "peak_rss_gib" in v else NR,
                         num(v.get("model_gflops"), 0), pct(v["mfu"]) if "mfu" in v else NR])
        out += table(["side", "samples/s", "s / optimizer step", "peak RSS", "model GFLOP/s", "MFU"], rows) + [""]
        for k, v in f["ratios"].items():
            pairs = v["pairs"] if isinstance(v["pairs"], list) else None
            out.append(f"- {k}: **{num(v['median'])}×**" + (f" ({', '.join(num(p) for p in pairs)})" if pairs else ""))
        for side, why in f.get("did_not_finish", {}).items():
            out.append(f"- {SIDE_NAMES.get(side, side)}: did not finish ({why})")
        peaks = f.get("matmul_peak_gflops")
        if peaks:
            out.append(f"- 4096³ matmul in this run: fp32 {num(peaks['fp32'], 0)} GFLOP/s, "
                       f"bf16 {num(peaks['bf16'], 0)}" + ("" if peaks["bf16"] == NR else " GFLOP/s"))
        out += ["", meta(r) + (f" {r['note']}" if r["note"] else ""), ""]
    return out


def accuracy(records: list[dict]) -> list[str]:
    out = ["## Accuracy against the Hugging Face Trainer", "",
           "`bench/accuracy_parity.py`: all-MiniLM-L6-v2 trained through `squad-ds train` and through the `Trainer` "
           "with run_qa's recipe (its logits scored by squad-ds's post-processing and metrics), several seeds a "
           "side. Spread: max − min over the seeds. The same seed gives squad-ds's fp32 and bf16 sides the same "
           "batches and dropout masks.", ""]
    runs = of(records, "accuracy_parity")
    for regime in dict.fromkeys(r["config"]["regime"] for r in runs):
        mine = [r for r in runs if r["config"]["regime"] == regime]
        out += [f"### Regime `{regime}`", "", f"{mine[0]['config']['work']}.", ""]
        rows, means = [], {}
        for r in mine:
            for side in dict.fromkeys(x["side"] for x in r["figures"]["rows"]):
                xs = [x for x in r["figures"]["rows"] if x["side"] == side]
                f1s = [x["f1"] for x in xs]
                means[side] = mean(f1s)
                seeds = ", ".join(f"{x['seed']}: {num(x['exact_match'])} / {num(x['f1'])}" for x in xs)
                rows.append([SIDE_NAMES.get(side, side), seeds,
                             f"{num(mean([x['exact_match'] for x in xs]))} / **{num(mean(f1s))}**",
                             num(max(f1s) - min(f1s)), f"{r['date']}, {machine_label(r['machine'])}"])
        out += table(["side", "seed: EM / F1", "mean EM / F1", "F1 spread", "measured"], rows) + [""]
        for side in means:
            for other in ("hf", "squad-ds"):
                pair = side != other and other in means and side.startswith("squad-ds")
                if pair and (other, side) != ("squad-ds", "hf"):
                    out.append(f"- ΔF1 {side} − {other} (means): **{means[side] - means[other]:+.2f}**")
        out.append("")
        out += [f"- {meta(r)}" + (f" {r['note']}" if r["note"] else "") for r in mine] + [""]
    return out


def search(records: list[dict]) -> list[str]:
    """`squad-ds search` studies: each trial's values, score and steps, with and without pruning."""
    runs = of(records, "search")
    if not runs:
        return []
    out = ["## Accuracy tuning: `squad-ds search`", "",
           "The same trials searched twice, without pruning and with `--pruner median`: F1 on the dev questions "
           "(and optimizer steps run), the steps and wall time of each study, and the best recipe "
           "(`best_recipe.yaml`) retrained with `squad-ds train --recipe`.", ""]
    for r in runs:
        f = r["figures"]
        best_u = max(f["trials"], key=lambda t: t["f1_unpruned"])
        best_m = max(f["trials"], key=lambda t: t["f1_median"] if t["pruned_at"] is None else -1)
        rows = [[t["trial"], f"{t['lr']:.2e}", num(t["warmup_proportion"], 3), num(t["weight_decay"], 3),
                 f"{'**' if t is best_u else ''}{num(t['f1_unpruned'])}{'**' if t is best_u else ''} "
                 f"({t['steps_unpruned']})",
                 (f"pruned at step {t['pruned_at']}: {num(t['f1_median'])} ({t['steps_median']})" if t["pruned_at"]
                  else f"{'**' if t is best_m else ''}{num(t['f1_median'])}{'**' if t is best_m else ''} "
                       f"({t['steps_median']})")] for t in f["trials"]]
        su, sm = sum(t["steps_unpruned"] for t in f["trials"]), sum(t["steps_median"] for t in f["trials"])
        rows.append(["all", "", "", "", f"{su} steps, {duration(f['wall_s_unpruned'])}",
                     f"**{sm} steps** ({pct(sm / su - 1)}), {duration(f['wall_s_median'])}"])
        out += [f"{r['config']['work']}.", ""]
        out += table(["trial", "lr", "warmup", "weight decay", "F1, no pruning (steps)", "F1, `--pruner median` "
                      "(steps)"], rows)
        same = f["best_recipe_retrained_f1"] == f["best_recorded_f1"]
        out += ["", f"- The pruned study's best recipe retrained to F1 {f['best_recipe_retrained_f1']!r}"
                + (" (what the study recorded, to the last digit)." if same else
                   f" against {f['best_recorded_f1']!r} recorded."),
                f"- {meta(r)}" + (f" {r['note']}" if r["note"] else ""), ""]
    return out


def tests(records: list[dict]) -> list[str]:
    """How long the test suite and its marked sets take (docs/TESTING.md says what each holds)."""
    runs = of(records, "tests")
    if not runs:
        return []
    out = ["## The test suite", "", "How long each set of tests took ([TESTING.md](TESTING.md) says what each "
           "holds and how CI runs them).", ""]
    rows = []
    for r in runs:
        f = r["figures"]
        took = f"{f['tests']:,} tests in {duration(f['wall_s'])}"
        if "install_train_score_s" in f:
            took = f"command 1 in {duration(f['install_train_score_s'])}; command 2: {took}"
        rows.append([r["key"], took, f"{r['date']}, {machine_label(r['machine'])}, {r['machine']['load']}"])
    out += table(["set", "took", "measured"], rows) + [""]
    out += [f"- {r['key']}: {meta(r)}" + (f" {r['note']}" if r["note"] else "") for r in runs] + [""]
    return out


THROUGHPUT_COLUMNS = [("impl", "side", str), ("zero", "ZeRO", str), ("optimizer", "optimizer", str),
                      ("batches", "batches", str), ("variant", "variant", str), ("micro", "micro", str),
                      ("attention_length", "attention length", lambda x: num(x, 1)),
                      ("tokens_per_sequence", "tokens / sequence (matmuls)", lambda x: num(x, 1)),
                      ("samples_per_s", "samples/s", lambda x: num(x, 1 if x >= 100 else 2)),
                      ("tflops", "TFLOP/s", lambda x: num(x, 1)),
                      ("mfu", "MFU", pct), ("peak_mem_gib", "peak memory", lambda x: f"{num(x)} GiB"),
                      ("error", "error", str)]


def gpu_and_batching(records: list[dict]) -> list[str]:
    out = ["## Throughput by batching and DeepSpeed setup", "",
           "`bench/train_throughput.py` (on a GPU through `bench/gpu.sh`): squad-ds's engine path and, where shown, "
           "`transformers.Trainer` with the same resolved DeepSpeed JSON, on the same windows and initial weights.", ""]
    for r in of(records, "train_throughput"):
        f, c = r["figures"], r["config"]
        out += [f"### {r['key']} ({machine_label(r['machine'])})", ""]
        out += rows_table(f["rows"], THROUGHPUT_COLUMNS)
        out.append("")
        for k, v in f.get("ratios", {}).items():
            out.append(f"- {k}: **{num(v['median'])}×** ({len(v['pairs'])} pair{'s' if len(v['pairs']) > 1 else ''})")
        desc = ", ".join(f"{k} {v}" for k, v in c.items())
        out += [f"- {desc}.", "", meta(r) + (f" {r['note']}" if r["note"] else ""), ""]
    for r in of(records, "padding"):
        out += ["### Padding and batch shapes (`bench/padding.py`)", "", f"{r['config']['data']}, "
                f"{r['config']['epochs']} epochs through the trainer's own `epoch_order` and `BatchLoader`.", ""]
        out += table(["micro", "policy", "tokens / sequence", "vs full", "distinct shapes"],
                     [[x["micro"], x["policy"], num(x["tokens_per_sequence"], 1)
                       + (f" (attention: {num(x['attention_length'], 1)})"
                          if abs(x.get("attention_length", x["tokens_per_sequence"]) - x["tokens_per_sequence"]) >= 0.05
                          else ""),
                       num(x["tokens_per_sequence"] / r["config"].get("seq", 384), 3), x["distinct_shapes"]]
                      for x in r["figures"]["rows"]])
        out += ["", meta(r) + f" {r['note']}", ""]
    for r in of(records, "packing_families"):
        c = r["config"]
        out += ["### Packed batches per model family (`bench/packing_families.py`)", "",
                f"{c['model']}, seq {c['seq']}, micro {c['micro']}, {c['batches']} length-grouped micro-batches; "
                "training forward + backward, median per micro-batch.", ""]
        out += table(["family", "tokens per window: full / trimmed / packed", "ms per step: full / trimmed / packed",
                      "packed vs trimmed", "packed vs full"],
                     [[fam, " / ".join(num(v[p]["tokens_per_window"], 1) for p in ("full", "trimmed", "packed")),
                       " / ".join(num(v[p]["ms_per_step"], 0) for p in ("full", "trimmed", "packed")),
                       f"{num(v['trimmed']['ms_per_step'] / v['packed']['ms_per_step'])}×",
                       f"{num(v['full']['ms_per_step'] / v['packed']['ms_per_step'])}×"]
                      for fam, v in r["figures"]["families"].items()])
        out += ["", meta(r) + f" {r['note']}", ""]
    return out


def data_and_scoring(records: list[dict]) -> list[str]:
    out = ["## Featurization and scoring", ""]
    rows = []
    for r in of(records, "featurize"):
        f = r["figures"]
        labels = (("cache_file_load_s", "cache file alone"), ("baseline_s", "run_qa.py's `datasets.map`"))
        extra = "".join(f"; {label} {num(f[k])} s" for k, label in labels if k in f)
        ratios = (f"; baseline ÷ squad-ds: {num(f['baseline_over_cold'], 1)}× cold, "
                  f"{num(f['baseline_over_featurize_only'], 1)}× featurize only") if "baseline_s" in f else ""
        rows.append([f"featurize {r['key']} (`bench/featurize.py`): {f['features']:,} windows",
                     f"cold {num(f['cold_s'])} s, from cache {num(f['from_cache_s'])} s{extra}{ratios}",
                     f"{r['date']}, {machine_label(r['machine'])}"])
    for r in of(records, "postprocess_score"):
        rows.append([f"post-process + score {r['key']} (`bench/postprocess_score.py`)",
                     f"{num(r['figures']['total_s'])} s", f"{r['date']}, {machine_label(r['machine'])}"])
    out += table(["what", "seconds", "measured"], rows) + [""]
    out += [f"- {meta(r)}" + (f" {r['note']}" if r["note"] else "")
            for r in of(records, "featurize") + of(records, "postprocess_score")]
    return out + [""]


def ask_and_serve(records: list[dict]) -> list[str]:
    out = ["## Asking and serving", ""]
    for r in of(records, "ask_speed"):
        f = r["figures"]
        out += [f"`bench/ask_speed.py`: {r['key']}, {r['config']['model']}, both sides in one process, interleaved.",
                ""]
        out += table(["side", "answers/s", "seconds per rep", "EM / F1"],
                     [[side, num(f[k]["answers_per_s"], 1), ", ".join(num(s) for s in f[k]["seconds"]),
                       f"{num(f[k]['exact_match'])} / {num(f[k]['f1'])}"]
                      for k, side in (("squad_ds", "`QuestionAnswerer`, one call"), ("diy", "transformers 5 by hand"))])
        out += ["", f"squad-ds ÷ by hand: **{num(f['ratio'])}×** the answers per second; first answer of "
                f"`squad-ds ask` in a fresh process: {num(f['ask_first_answer_s'])} s.", "", meta(r) + f" {r['note']}", ""]
    serve = of(records, "serve_load")
    plain = [r for r in serve if "quiet" not in r["figures"]]
    if plain:
        out += ["`bench/serve_load.py`: `squad-ds serve` in its own process, clients cycling through the dev "
                "sample's questions, every answer checked against the Python API's.", ""]
        out += table(["clients", "answered", "wrong / errors", "answers/s", "p50 / p90 / p99 latency", "per batch",
                      "measured"],
                     [[r["config"]["clients"], f"{r['figures']['answered']:,}",
                       f"{r['figures']['n_wrong']} / {r['figures']['n_errors']}", num(r["figures"]["answers_per_s"], 1),
                       " / ".join(f"{val(r['figures']['latency_ms'][p])} ms" for p in ("p50", "p90", "p99")),
                       num(r["figures"]["per_batch"], 1), f"{r['date']}, {machine_label(r['machine'])}"]
                      for r in plain])
        out += [""] + [f"- {meta(r)}" for r in plain] + [""]
    for r in serve:
        if "quiet" not in r["figures"]:
            continue
        f = r["figures"]
        q, s = f["quiet"], f["with_slow_clients"]
        out += [f"With slow clients ({r['config']['model']}; {r['config']['clients']} clients): quiet "
                f"**{num(q['answers_per_s'], 1)} answers/s**, p50 {num(q['latency_ms']['p50'], 1)} ms, p99 "
                f"{num(q['latency_ms']['p99'], 1)} ms; with {s['slow_clients']['clients']} slow clients beside them "
                f"**{num(s['answers_per_s'], 1)} answers/s**, p50 {num(s['latency_ms']['p50'], 1)} ms, p99 "
                f"{num(s['latency_ms']['p99'], 1)} ms (p99 ratio {num(f['p99_ratio'])}); {q['answered']:,} and "
                f"{s['answered']:,} answers, {q['n_wrong'] + s['n_wrong']} wrong; "
                f"{s['slow_clients']['requests_ended']['408']} slow requests ended with 408. "
                "Limits: [ASK.md](ASK.md#limits).", "", meta(r) + f" {r['note']}", ""]
    return out


def plan_estimate(r: dict) -> str:
    """What `squad-ds plan` estimates today for a memory_fit row (— for a setup it does not know)."""
    from squad_ds.training import memory as mem
    from squad_ds.training.ds_config import load_ds_config

    try:
        setup = mem.Setup.of(load_ds_config(r["ds_config"]), 1)
    except Exception:  # noqa: BLE001 - a setup the plan does not cover is shown without an estimate
        return "—"
    shape = mem.Shape(r["params"], r["num_hidden_layers"], r["hidden_size"], r["num_attention_heads"],
                      r["intermediate_size"], 30522)
    e = mem.estimate(shape, setup, seq=r["seq"], micro=r["micro"], checkpointing=r["activation_checkpointing"],
                     cuda=False)
    return f"{num(e.device_bytes / GIB)} GiB"


def memory(records: list[dict], runs: list[dict]) -> list[str]:
    out = ["## Memory: what fits on a CPU, by setup", "",
           "`bench/memory_fit.py`: peak resident memory (the kernel's maximum resident set of the process) of real "
           "`squad-ds train` runs and of the `Trainer` on randomly initialised BERT shapes with the QA head, the "
           "shipped SQuAD sample's windows at 384, two optimizer steps (squad-ds saves its final checkpoint). "
           "Anonymous peak: the largest RssAnon sampled every 0.2 s (the peak RSS also counts pages of the "
           "memory-mapped weights being loaded, which the kernel can drop under a ceiling). Disk: the process's "
           "reads and writes reaching storage (/proc/PID/io) over the whole run: load, steps, checkpoint. "
           "Ceiling: the run was in a cgroup with that memory limit, enforced by the kernel (no swap). plan: what "
           "`squad-ds plan` estimates for it today, for squad-ds's rows measured as it trains today: every batch "
           "padded to the full window (the worst case the plan estimates) and the malloc setting squad-ds gives the "
           "run (`training/allocator.py`: freed memory returned to the kernel under ZeRO-3, offload or activation "
           "checkpointing, glibc's defaults in the others); `tests/test_plan.py` holds each of them within ±15 %. "
           "Earlier rows (no plan figure) ran with other malloc settings or length-trimmed batches, and are kept as "
           "what they measured; the Trainer's rows trim batches to their longest window (its dynamic padding).", ""]
    cap = capacity(runs)
    if cap:
        out += ["### The largest model that trains, by setup", "",
                "Micro-batch 1 at 384, no activation checkpointing, under the ceiling: the largest BERT shape that "
                "completed and the smallest the kernel killed (sizes between were not run), and its size against "
                "the largest the plain Trainer completed under the same ceiling.", ""]
        crows = []
        for c in cap:
            base = trainer_largest(cap, c["ceiling"])
            fit, killed = c["fit"], c["killed"]
            crows.append([f"{num(c['ceiling'] / GIB, 0)} GiB", c["setup"],
                          f"**{num(fit['params'] / 1e9)} B** ({num(fit['peak_rss_bytes'] / GIB, 1)} GiB peak)"
                          if fit else "none run fitted",
                          f"{num(killed['params'] / 1e9)} B" if killed else "none run",
                          f"{num(fit['params'] / base['params'])}×" if fit and base else "—",
                          "; ".join(dict.fromkeys(f"{r['date']}, {memory_machine(r['machine'])}"
                                                  for r in (fit, killed) if r))])
        out += table(["ceiling", "setup", "largest completed", "smallest killed", "against the Trainer's largest",
                      "measured"], crows) + [""]
    batch = micro_capacity(runs, "bert-large")
    if batch:
        out += ["### The largest micro-batch at bert-large, 384", "",
                "BERT-large's shape (334 M parameters, random init) under the ceiling: the largest micro-batch that "
                "completed and the smallest the kernel killed (sizes between were not run).", ""]
        out += table(["ceiling", "setup", "act. checkpointing", "largest completed", "smallest killed",
                      "s / step at the largest", "tokens / s", "measured"],
                     [[f"{num(c['ceiling'] / GIB, 0)} GiB", c["setup"], "yes" if c["ckpt"] else "no",
                       f"**{c['fit']['micro']}** ({num(c['fit']['peak_rss_bytes'] / GIB, 1)} GiB peak)"
                       if c["fit"] else "none run fitted", c["killed"]["micro"] if c["killed"] else "none run",
                       num(c["fit"]["s_per_step"]) if c["fit"] and c["fit"].get("s_per_step") else "—",
                       num(c["fit"]["micro"] * c["fit"]["seq"] / c["fit"]["s_per_step"], 0)
                       if c["fit"] and c["fit"].get("s_per_step") else "—",
                       "; ".join(dict.fromkeys(f"{r['date']}, {memory_machine(r['machine'])}"
                                               for r in (c["fit"], c["killed"]) if r))] for c in batch]) + [""]
    from memory_fit import as_trained_today

    rows = []
    for r in runs:
        side = r.get("side") or ("hf" if r["ds_config"] in TRAINER else "squad-ds")
        setup, plan = setup_name(r), "—"
        if side == "squad-ds" and as_trained_today(r):  # earlier rows measured other settings
            plan = plan_estimate(r)
        peak = f"{num(r['peak_rss_bytes'] / GIB)} GiB" if r["rc"] == 0 else (
            "killed by the kernel (OOM)" if r.get("ceiling_bytes") else f"failed (exit {r['rc']})")
        anon = f"{num(r['peak_anon_bytes'] / GIB)} GiB" if r["rc"] == 0 and r.get("peak_anon_bytes") else "—"
        disk = (f"{num(r['disk_read_bytes'] / 1e9, 0)} / {num(r['disk_written_bytes'] / 1e9, 0)} GB"
                if r["rc"] == 0 and "disk_read_bytes" in r else "—")
        rows.append([r["shape"], f"{num(r['params'] / 1e6, 0)} M", setup, r["micro"],
                     "yes" if r["activation_checkpointing"] else "no",
                     f"{num(r['ceiling_bytes'] / GIB, 0)} GiB" if r.get("ceiling_bytes") else "—", peak, anon, plan,
                     num(r["s_per_step"]) if r["rc"] == 0 and "s_per_step" in r else "—",
                     num(r["micro"] * r["accum"] * r["seq"] / r["s_per_step"], 0)
                     if r["rc"] == 0 and r.get("s_per_step") else "—", disk,
                     f"{r['date']}, {memory_machine(r['machine'])}"])
    out += table(["shape", "parameters", "setup", "micro-batch", "act. checkpointing", "ceiling", "peak",
                  "anonymous peak", "plan", "s / step", "tokens / s", "disk read / written (whole run)", "measured"],
                 rows)
    out += ["", f"![Peak memory against parameters by setup](plots/{MEMORY_PLOT.name})", "",
            "Commands: `python bench/memory_fit.py --shape SHAPE --ds CONFIG --seq 384 --micro N [--ceiling-gib G]` "
            "(`--side hf` for the Trainer) for a row; the plot is drawn by `python bench/report.py`. "
            "Seconds per step are inflated where other work ran beside the runs.", ""]
    for r in of(records, "memory_fit"):
        f = r["figures"]
        if "rows" in f:
            what = "; ".join(f"{x['shape']}, micro {x['micro']}: {num(x['peak_gib_deepspeed_defaults'])} GiB with "
                             f"DeepSpeed's defaults, {num(x['peak_gib_squad_ds'])} GiB with squad-ds's sizing"
                             for x in f["rows"])
        else:
            what = (f"peak {'–'.join(num(g, 1) for g in f['peak_gib'])} GiB, about {val(f['s_per_step'])} s a step, "
                    f"{duration(60 * f['wall_min'])} in all")
        out.append(f"- {r['key']} ({r['config']['setup']}): {what}. {meta(r)} {r['note']}")
    return out + [""]
