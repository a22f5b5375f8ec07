"""Running the real trainer in subprocesses on a tiny random BERT (fp32, CPU) and reading what it wrote."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_model(directory: Path, dropout: float = 0.0) -> Path:
    """A 2-layer hidden-32 BERT with the real uncased vocab (the MiniLM tokenizer), random weights."""
    from tiny_models import save_tiny_checkpoint, tiny_bert_config

    from squad_ds.modeling.factory import load_tokenizer

    tok = load_tokenizer("all-MiniLM-L6-v2")
    cfg = tiny_bert_config(tokenizer=tok, max_position_embeddings=64, dropout=dropout)
    return save_tiny_checkpoint(directory, cfg, tok)


def write_recipe(path: Path, model_dir: Path, out_dir: Path, **sections) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_file": "sample:train", "eval_file": "sample:dev", "max_seq_length": 64, "doc_stride": 32,
                 "max_query_length": 16, "max_train_examples": 48, "max_eval_examples": 16,
                 "cache_dir": str(path.parent / "cache")},
        "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 1e-3, "log_steps": 1, "seed": 7},
        "eval": {"batch_size": 8},
        "output": {"dir": str(out_dir), "export": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path


def env(threads: int = 2) -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    e["OMP_NUM_THREADS"] = str(threads)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def train_cmd(recipe: Path, *args: str, launcher: str = "python", nproc: int = 1,
              ds_config: str | None = "cpu_fp32") -> list[str]:
    """None for `ds_config`: name no DeepSpeed config (the run takes the hardware's default)."""
    named = ["--deepspeed_config", ds_config] if ds_config else []
    tail = ["squad_ds.train", "--recipe", str(recipe), *named, *args]
    if launcher == "python":
        return [sys.executable, "-m", *tail]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}", "-m", *tail]
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()), "--module", *tail]
    raise ValueError(launcher)


def run_train(recipe: Path, *args: str, launcher: str = "python", nproc: int = 1,
              ds_config: str | None = "cpu_fp32", check: bool = True, timeout: int = 600,
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    threads = max(1, 2 // nproc)
    proc = subprocess.run(train_cmd(recipe, *args, launcher=launcher, nproc=nproc, ds_config=ds_config),
                          env={**env(threads), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc


def losses(out_dir: Path) -> dict[int, float]:
    """step → loss from train_log.jsonl (a resumed run appends; later lines for a step win)."""
    out = {}
    for line in (out_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def final_json(proc: subprocess.CompletedProcess) -> dict:
    """The trainer's closing JSON line (launchers print their own lines after it)."""
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
