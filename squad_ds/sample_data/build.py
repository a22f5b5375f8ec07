"""Regenerate the shipped samples from the shared SQuAD files, byte for byte.

    python -m squad_ds.sample_data.build --squad-dir ../shared/squad [--out-dir DIR]

Whole paragraphs (all their questions) are drawn one per article, round-robin over a seeded shuffle of the
articles, until the question target is reached; articles and paragraphs keep their original order, so each
sample is itself a valid SQuAD file of the same version.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import random
from pathlib import Path

from squad_ds.data.squad import read_json
from squad_ds.sample_data import SAMPLE_DEV, SAMPLE_DEV_V2, SAMPLE_DIR, SAMPLE_TRAIN

SEED = 20160616  # SQuAD v1.1 arXiv date; any fixed value will do
# (output, source file in --squad-dir, target number of questions)
SAMPLES = [
    (SAMPLE_TRAIN.name, "train-v1.1.reconstructed.json", 1500),
    (SAMPLE_DEV.name, "dev-v1.1.json", 400),
    (SAMPLE_DEV_V2.name, "dev-v2.0.reconstructed.json", 300),
]


def sample_squad(raw: dict, target: int, seed: int = SEED) -> dict:
    """About `target` questions as whole paragraphs spread over as many articles as possible."""
    rng = random.Random(seed)
    order = list(range(len(raw["data"])))
    rng.shuffle(order)
    # Per article, a seeded queue of its paragraph indices.
    queues = {a: rng.sample(range(len(raw["data"][a]["paragraphs"])), len(raw["data"][a]["paragraphs"]))
              for a in order}
    chosen: dict[int, set[int]] = {}
    n = 0
    while n < target and any(queues.values()):
        for a in order:
            if n >= target:
                break
            if queues[a]:
                p = queues[a].pop()
                chosen.setdefault(a, set()).add(p)
                n += len(raw["data"][a]["paragraphs"][p]["qas"])
    data = []
    for a in sorted(chosen):
        article = raw["data"][a]
        data.append({"title": article["title"],
                     "paragraphs": [para for i, para in enumerate(article["paragraphs"]) if i in chosen[a]]})
    return {"version": raw["version"], "data": data}


def write_gzip_json(obj: dict, path: Path) -> None:
    """Deterministic gzip: no file name or time stamp in the header."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    path.write_bytes(buf.getvalue())


def build(squad_dir: Path, out_dir: Path = SAMPLE_DIR, seed: int = SEED) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source, target in SAMPLES:
        sample = sample_squad(read_json(squad_dir / source), target, seed)
        write_gzip_json(sample, out_dir / name)
        written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--squad-dir", type=Path, required=True, help="folder with the shared SQuAD files")
    p.add_argument("--out-dir", type=Path, default=SAMPLE_DIR, help="default: the package's sample_data folder")
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    for path in build(args.squad_dir, args.out_dir, args.seed):
        print(f"{path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
