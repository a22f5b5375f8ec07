"""From a checkpoint to a model people can use: a standard Hugging Face directory (config, safetensors, tokenizer,
squad_ds.json, a model card), optionally pushed to the Hub or converted to ONNX.

The weights always come from the checkpoint's files, whichever ZeRO stage wrote them: what is exported is exactly
what was saved (the best evaluation's checkpoint as well as the last one), and `squad-ds export` can do it later,
without DeepSpeed's engine, from any complete checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from squad_ds import atomic, distributed
from squad_ds.model_record import MODEL_RECORD
from squad_ds.errors import CheckpointError, ConfigError, ModelLoadError, disk_error, file_in_the_way
from squad_ds.logs import log_main
from squad_ds.training import checkpoint

SQUAD_LICENCE = ("SQuAD (Rajpurkar et al., 2016, 2018), CC BY-SA 4.0: https://rajpurkar.github.io/SQuAD-explorer/; "
                 "a model fine-tuned on it is commonly shared under the same terms")


def state_dict_from_checkpoint(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full-precision weights of checkpoint `tag`: from ZeRO's fp32 shards when the optimizer was partitioned (or
    mixed precision kept fp32 masters there), else from the module states DeepSpeed saved whole."""
    tag_dir = Path(ckpt_dir) / tag
    if not (tag_dir / checkpoint.MARKER).is_file():
        raise CheckpointError(f"{tag_dir}: not a complete squad-ds checkpoint (no {checkpoint.MARKER})")
    sd = None
    if (tag_dir / "offloaded_tensors").is_dir():  # ZeRO-3 with the optimizer on NVMe
        from squad_ds.training.nvme import state_dict_from_offloaded

        sd = state_dict_from_offloaded(Path(ckpt_dir), tag)
    elif any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except (ValueError, FileNotFoundError, KeyError):
            # bf16/fp16 without ZeRO writes its optimizer files in a layout zero_to_fp32 does not read: the
            # module's half-precision weights below are then all there is.
            sd = None
    if sd is None:
        states = tag_dir / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise CheckpointError(f"{tag_dir}: neither ZeRO optimizer shards nor {states.name}")
        sd = checkpoint.safe_load(states)["module"]
        empty = next((k for k, v in sd.items() if v.numel() == 0), None)
        if empty is not None:  # ZeRO-3 keeps placeholders here; its weights are in the shards
            raise CheckpointError(f"{tag_dir}: weight {empty} is a ZeRO-3 placeholder and the shards did not load")
    sd = {k: v.detach().float().cpu() for k, v in sd.items()}
    bad = next((k for k, v in sd.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"not exporting {tag_dir}: weight {bad} holds NaN or infinite values (training "
                              "diverged, or the checkpoint is damaged)")
    return sd


def model_card(record: dict[str, Any], model_type: str, position_embedding_type: str | None) -> str:
    """model/README.md: what the model is, how it was trained, how it scored, how to load it."""
    recipe, step, metrics = record["recipe"], record["step"], record.get("metrics") or {}
    tr, data, plan = recipe["train"], recipe["data"], record.get("plan") or {}
    relative = position_embedding_type in ("relative_key", "relative_key_query")
    scores = "\n".join(f"| {k} | {v:.2f} |" for k, v in metrics.items() if isinstance(v, (int, float))) or \
        "| (not evaluated) | |"
    load = ("from squad_ds.modeling.factory import load_qa_model\nmodel = load_qa_model(\"PATH\")  # relative "
            "position embeddings: transformers 5 drops them, squad-ds's loader keeps them" if relative else
            "from transformers import AutoModelForQuestionAnswering, AutoTokenizer\n"
            "model = AutoModelForQuestionAnswering.from_pretrained(\"PATH\")\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
    settings = [
        ("base model", f"{recipe['model']['name_or_path']} ({model_type}"
                       f"{', ' + str(position_embedding_type) if relative else ''})"),
        ("train file", data["train_file"]), ("eval file", data["eval_file"]),
        ("max_seq_length / doc_stride / max_query_length",
         f"{data['max_seq_length']} / {data['doc_stride']} / {data['max_query_length']}"),
        ("epochs / max_steps", f"{tr['epochs']} / {tr['max_steps']}"),
        ("global batch (micro-batch x accumulation x processes)",
         f"{plan.get('global_batch')} ({plan.get('micro_batch')} x {plan.get('accumulation')} x "
         f"{plan.get('world_size')})"),
        ("learning rate / warmup proportion / weight decay",
         f"{tr['lr']} / {tr['warmup_proportion']} / {tr['weight_decay']}"),
        ("seed", tr["seed"]), ("DeepSpeed config", recipe.get("deepspeed_config")),
    ]
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings)
    return f"""---
library_name: transformers
pipeline_tag: question-answering
tags: [question-answering, squad, squad-ds, deepspeed]
datasets: [{"rajpurkar/squad_v2" if data["version"] == "2.0" else "rajpurkar/squad"}]
---
# {Path(recipe["output"]["dir"]).name}: {recipe["model"]["name_or_path"]} fine-tuned on SQuAD v{data["version"]}

{recipe.get("description", "").strip()}

Fine-tuned with squad-ds (a DeepSpeed training loop); exported from optimizer step {step}
(`{record.get("checkpoint", "")}`).

## Scores ({"dev set, " if metrics else ""}official SQuAD v{data["version"]} EM/F1)
| metric | value |
|---|---|
{scores}

## Training
| setting | value |
|---|---|
{rows}

The full recipe is in `squad_ds.json` (`squad-ds predict DATA --model PATH` reads its data and eval settings).

## Use
```python
{load}
```

## Data licence
{SQUAD_LICENCE}.
"""


RECORD = MODEL_RECORD  # in every model directory squad-ds writes, first: the proof that it wrote it


def is_model_dir(path: Path) -> bool:
    """`path` is a model directory squad-ds wrote (or began to write): its squad_ds.json names a recipe."""
    try:
        record = json.loads((path / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "recipe" in record


def _staging(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".tmp")


def replaceable(path: Path) -> bool:
    """Whether a model directory may be written at `path`: nothing there, an empty directory, or a model directory
    squad-ds wrote. Anything else (a file, a link, someone's directory) is the user's."""
    if not path.exists() and not path.is_symlink():
        return True
    return path.is_dir() and not path.is_symlink() and (not any(path.iterdir()) or is_model_dir(path))


def check_target(out_dir: str | Path) -> Path:
    """Refuse a model directory to write that would replace something squad-ds did not write: `out_dir` and its
    staging name must each be replaceable."""
    out_dir = Path(out_dir).absolute()  # "." has no name to stage beside
    if not out_dir.name:
        raise ConfigError(f"--out {out_dir}: a file-system root, not a model directory to replace (choose a folder "
                          "inside it)")
    in_the_way = file_in_the_way(out_dir.parent)
    if in_the_way:
        raise ConfigError(f"--out {out_dir}: {in_the_way} (choose another path)")
    for path in (out_dir, _staging(out_dir)):
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise ConfigError(f"{path} exists and is not a directory: not replacing it with a model directory "
                              "(choose another path)")
        if not replaceable(path):
            raise ConfigError(f"{path} is not empty and is not a model directory squad-ds wrote (no {RECORD} "
                              "there): not replacing it (choose another path, or empty it yourself)")
    return out_dir


def _remove_own(path: Path) -> None:
    """Remove `path` if it is replaceable (checked again here: never clear what is not ours)."""
    if not replaceable(path):
        raise ConfigError(f"{path} is not a model directory squad-ds wrote: not removing it")
    if path.is_dir():
        shutil.rmtree(path)


def _follow_umask(directory: Path) -> None:
    """Files as an ordinary write under the user's umask: safetensors writes its file 0600."""
    mask = atomic.umask()
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_model_dir(model, tokenizer, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
                    record: dict[str, Any]) -> Path:
    """config + safetensors + tokenizer + squad_ds.json + README.md, staged and then moved into place. Only an empty
    directory or a model directory squad-ds wrote is ever replaced (check_target)."""
    out_dir = check_target(out_dir)
    tmp = _staging(out_dir)
    _remove_own(tmp)  # a killed export's leftovers
    try:
        tmp.mkdir(parents=True)
        atomic.write_json(tmp / RECORD, record)  # first: what proves the directory is ours if this export dies
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        if not (tmp / "config.json").is_file():  # save_pretrained logs some failures and returns
            raise CheckpointError(f"exporting to {tmp}: transformers wrote no config.json there")
        tokenizer.save_pretrained(str(tmp))
        cfg = model.config
        (tmp / "README.md").write_text(model_card(record, cfg.model_type,
                                                  getattr(cfg, "position_embedding_type", None)), encoding="utf-8")
        _follow_umask(tmp)
    except Exception as e:  # safetensors reports a full disk in its own exception type
        disk = disk_error(e, tmp)
        if disk is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk from e
    _remove_own(out_dir)
    os.replace(tmp, out_dir)
    log_main("exported model to %s", out_dir)
    return out_dir


def export_hf(model, tokenizer, ckpt_dir: Path, tag: str, out_dir: str | Path, record: dict[str, Any]) -> Path | None:
    """During a run: rank 0 writes the model directory of checkpoint `tag`; a failure stops every rank."""
    record = {**record, "checkpoint": str(Path(ckpt_dir) / tag)}
    return distributed.on_main(lambda: write_model_dir(model, tokenizer, state_dict_from_checkpoint(ckpt_dir, tag),
                                                       out_dir, record))


def locate(source: str | Path, step: int | None = None, best: bool = False) -> tuple[Path, str]:
    """(checkpoints dir, tag) for `squad-ds export SOURCE`: a run directory, its checkpoints directory or one tag
    directory; --step N picks that step's tag, --best the best evaluation's, else the newest complete one."""
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such run or checkpoint directory")
    if (src / checkpoint.MARKER).is_file():
        ckpt_dir, tag = src.parent, src.name
    else:
        ckpt_dir = src / "checkpoints" if (src / "checkpoints").is_dir() else src
        tags = checkpoint.complete_tags(ckpt_dir)
        if not tags:
            raise FileNotFoundError(f"{src}: no complete squad-ds checkpoint (a run directory, its checkpoints/ or a "
                                    f"step directory with {checkpoint.MARKER})")
        tag = tags[-1]
    if step is not None:
        tag = checkpoint.tag_for(step)
        if not (ckpt_dir / tag / checkpoint.MARKER).is_file():
            have = ", ".join(str(int(t[4:])) for t in checkpoint.complete_tags(ckpt_dir))
            raise FileNotFoundError(f"--step {step}: no complete checkpoint of that step in {ckpt_dir} (have: {have})")
    elif best:
        recorded = checkpoint.marker(ckpt_dir, tag).get("best")
        if not recorded:
            raise CheckpointError(f"--best: {ckpt_dir / tag} records no best evaluation (the run had no evaluation "
                                  "during training); give --step")
        tag = recorded.get("tag") if isinstance(recorded, dict) else None
        if not isinstance(tag, str) or Path(tag).name != tag or not tag.startswith("step"):
            raise CheckpointError(f"--best: the marker of {ckpt_dir} records its best evaluation in a form squad-ds "
                                  "did not write; give --step")
        if not (ckpt_dir / tag / checkpoint.MARKER).is_file():
            raise FileNotFoundError(f"--best: the best evaluation's checkpoint {ckpt_dir / tag} was pruned (set "
                                    "train.keep_best: true to keep it)")
    problem = checkpoint.check(ckpt_dir / tag)
    if problem is not None:
        raise CheckpointError(problem)
    return ckpt_dir, tag


def export_command(source: str, step: int | None, best: bool, out: str | None, push: str | None,
                   onnx: bool) -> dict[str, Any]:
    """`squad-ds export`: a model directory from any complete checkpoint, without DeepSpeed's engine; the base
    model named by the run's recipe must be loadable (it gives the architecture and the tokenizer)."""
    from squad_ds.modeling.factory import load_qa_model, load_tokenizer

    ckpt_dir, tag = locate(source, step, best)
    marker = checkpoint.marker(ckpt_dir, tag)
    recipe, at = marker.get("recipe"), int(marker["step"])
    if not recipe:
        raise CheckpointError(f"{ckpt_dir / tag}: its marker records no recipe (saved by an older squad-ds)")
    run = ckpt_dir.parent
    evals = run / f"eval-{at}" / "eval_results.json"
    metrics = json.loads(evals.read_text()) if evals.is_file() else None
    if metrics is None and (marker.get("best") or {}).get("step") == at:
        metrics = marker["best"]["metrics"]
    layout = marker.get("layout") or {}
    plan = {"micro_batch": layout.get("micro_batch"), "accumulation": layout.get("accumulation"),
            "world_size": layout.get("world_size")}
    if None not in plan.values():
        plan["global_batch"] = plan["micro_batch"] * plan["accumulation"] * plan["world_size"]
    out_dir = check_target(Path(out) if out else run / f"model-{tag}")  # before the model is loaded
    name = recipe["model"]["name_or_path"]
    model = load_qa_model(name, attn_implementation=recipe["model"].get("attn_implementation", "sdpa"))
    tokenizer = load_tokenizer(recipe["model"].get("tokenizer") or name)
    record = {"recipe": recipe, "step": at, "metrics": metrics, "export": "command", "plan": plan,
              "checkpoint": str(ckpt_dir / tag)}
    write_model_dir(model, tokenizer, state_dict_from_checkpoint(ckpt_dir, tag), out_dir, record)
    result: dict[str, Any] = {"dir": str(out_dir), "step": at, "checkpoint": str(ckpt_dir / tag), **(metrics or {})}
    if onnx:
        result["onnx"] = str(export_onnx(out_dir, out_dir / "model.onnx"))
    if push:
        result["pushed"] = push_to_hub(out_dir, push)
    return result


def check_can_push(repo_id: str, folder: Path | None = None) -> None:
    """Offline mode is known before anything is sent: a clear error at once, not a network timeout."""
    if "/" not in repo_id.strip("/"):
        raise ConfigError(f"--push-to-hub {repo_id}: a Hub repository is OWNER/NAME")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        later = f"; the exported model stays in {folder}" if folder else ""
        raise ModelLoadError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, nothing can be uploaded{later} "
                             "(unset it, or push later: squad-ds export RUN_DIR --push-to-hub REPO)")


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload an exported model directory; a clear error, never a hang, without network or credentials."""
    from huggingface_hub import HfApi

    check_can_push(repo_id, folder)
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="squad-ds export")
    except Exception as e:  # noqa: BLE001 - the hub client's HTTP library (and its errors) changes between releases
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelLoadError(f"--push-to-hub {repo_id}: {type(e).__name__}: {first[:300]} (the exported model stays "
                             f"in {folder})") from None
    return str(getattr(info, "commit_url", info))


def export_onnx(model_dir: Path, out_file: Path, opset: int = 17) -> Path:
    """model_dir (an exported BERT-family model) as ONNX: input_ids/attention_mask/token_type_ids in,
    start_logits/end_logits out, batch and sequence dimensions dynamic."""
    from squad_ds.modeling.factory import load_qa_model
    from squad_ds.modeling.heads import forward_keys

    try:
        import onnx  # noqa: F401 - torch.onnx.export needs it; a missing extra is the user's to install
    except ImportError:
        raise ConfigError("--onnx needs the onnx extra: pip install \"squad-ds[onnx]\"") from None
    model = load_qa_model(str(model_dir), attn_implementation="eager").eval()
    if model.config.model_type == "xlnet":
        raise ConfigError("--onnx: XLNet's beam-search heads are not exported (BERT-family models only)")
    # Token types where the model takes them and has more than one (RoBERTa has one; DistilBERT and ModernBERT
    # take none: `getattr`, since their configs have no type_vocab_size).
    takes_types = "token_type_ids" in forward_keys("bert", train=False, config=model.config)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_types and
                                               getattr(model.config, "type_vocab_size", 0) > 1 else [])

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *inputs):
            out = self.m(**dict(zip(names, inputs)))
            return out.start_logits, out.end_logits

    example = tuple(torch.ones(1, 16, dtype=torch.long) for _ in names)
    dims = {n: {0: "batch", 1: "sequence"} for n in names}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed over it: a full disk leaves no half-written model.onnx (the exporter's
    # OSError names no file; it is made to name the target).
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    try:
        torch.onnx.export(Logits(model), example, str(tmp), input_names=names,
                          output_names=["start_logits", "end_logits"], dynamic_axes=dims, opset_version=opset,
                          dynamo=False)
        os.replace(tmp, out_file)
    except BaseException as e:
        with contextlib.suppress(OSError):  # a read-only file system refuses even this
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            e.filename = str(out_file)
        raise
    log_main("wrote %s", out_file)
    return out_file
