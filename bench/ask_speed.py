"""Answers per second: squad-ds's Python API (QuestionAnswerer: windows with stride, n-best spans across windows)
against the "do it yourself" path that transformers 5's migration guide shows in place of the removed QA pipeline
(tokenizer + AutoModelForQuestionAnswering + argmax of the start and end logits), on the same model and dev
questions, in one process, interleaved and repeated; each side's F1 on those questions; and the first-answer
latency of `squad-ds ask` (a fresh process: start-up, model load and one answer).

    python bench/ask_speed.py --model runs/demo/model [--questions 200] [--reps 3] [--out result.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import harness


def diy_answers(model, tokenizer, questions, contexts, max_length: int, batch_size: int) -> list[str]:
    """The migration guide's recipe, batched: one window per question (the context truncated to max_length),
    the argmax start and end tokens, the text between their character offsets."""
    import torch

    out = []
    for i in range(0, len(questions), batch_size):
        q, c = questions[i:i + batch_size], contexts[i:i + batch_size]
        enc = tokenizer(q, c, truncation="only_second", max_length=max_length, padding=True,
                        return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")
        with torch.no_grad():
            logits = model(**enc)
        starts, ends = logits.start_logits.argmax(-1), logits.end_logits.argmax(-1)
        for k, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
            seq = enc.sequence_ids(k)
            if e < s or seq[s] != 1 or seq[e] != 1:
                out.append("")  # the argmax fell outside the context or ran backwards: no answer
            else:
                out.append(c[k][offsets[k, s, 0]:offsets[k, e, 1]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="as squad-ds ask's --set")
    ap.add_argument("--out", default=None)
    harness.add_arguments(ap)
    args = ap.parse_args()

    import torch

    from squad_ds.ask import QuestionAnswerer
    from squad_ds.data.files import resolve_data_path
    from squad_ds.data.squad import load_squad
    from squad_ds.scoring.metrics import score

    dataset = load_squad(resolve_data_path("sample:dev"))
    dataset.examples = dataset.examples[:args.questions]
    questions = [e.question for e in dataset.examples]
    contexts = [e.context for e in dataset.examples]
    qa = QuestionAnswerer(args.model, overrides=args.overrides)
    d = qa.recipe.data
    answers: dict[str, list[str]] = {}

    def run(side: str, rep: int, qa=qa) -> dict:
        ask = (lambda: [a.text for a in qa(questions, contexts)]) if side == "squad_ds" else (
            lambda: diy_answers(qa.model, qa.tokenizer, questions, contexts, d.max_seq_length,
                                qa.recipe.eval.batch_size))
        seconds, answers[side] = harness.timed(ask)
        return {"seconds": seconds}

    rows = harness.interleave(["squad_ds", "diy"], args.reps, run)
    times = {side: [r["seconds"] for r in rows if r["side"] == side] for side in ("squad_ds", "diy")}
    result = {"model": args.model, "questions": len(questions), "reps": args.reps,
              "windows": {"max_seq_length": d.max_seq_length, "doc_stride": d.doc_stride},
              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    for side in times:
        ids = [e.id for e in dataset.examples]
        result[side] = {"answers_per_s": round(len(questions) / harness.stats(times[side])["median"], 1),
                        "seconds": [round(t, 2) for t in times[side]],
                        **{k: round(v, 2) for k, v in score(dataset, dict(zip(ids, answers[side]))).items()
                           if k in ("exact_match", "f1")}}
    result["ratio"] = round(harness.paired(rows, "diy", "squad_ds", "seconds")["median"], 2)
    del qa, run  # the model's memory, before the fresh process
    q, c = questions[0], contexts[0]
    proc = harness.run_process([sys.executable, "-m", "squad_ds.cli", "ask", "--model", args.model, "--question", q,
                                "--context", c, *[a for o in args.overrides for a in ("--set", o)]])
    result["ask_first_answer_s"] = round(proc["wall_s"], 2)
    if proc["returncode"] != 0:
        raise SystemExit(proc["stderr"][-2000:])
    harness.report(result, args.out)
    harness.save(harness.record("ask_speed", result, key=f"{len(questions)} dev-sample questions",
                                config={"model": args.model, "threads": result["torch_threads"],
                                        "windows": result["windows"]}), args.results)


if __name__ == "__main__":
    main()
