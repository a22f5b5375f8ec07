"""Small real tokenizers built offline, for tests.

`build_xlnet_tokenizer` trains a SentencePiece-style Unigram model on some text with the `tokenizers` trainers and
wraps it in transformers' XLNet tokenizer: XLNet's normalizer and Metaspace pre-tokenizer, its special tokens, the
post-processor "$A <sep> $B <sep> <cls>" with type ids 0/1/2, pad type id 3 and left padding. No download needed.
"""
from __future__ import annotations

import json
from typing import Iterable

XLNET_SPECIALS = ["<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>", "<eod>", "<eop>"]


def build_xlnet_tokenizer(texts: Iterable[str], vocab_size: int = 4000):
    """An XLNet-style fast tokenizer (padding_side="left", <cls> last) with a Unigram vocab trained on `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import XLNetTokenizerFast

    # The same normalizer / pre-tokenizer XLNetTokenizerFast builds, so the trained pieces fit its pipeline.
    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Replace("``", '"'), normalizers.Replace("''", '"'),
                                                   normalizers.NFKD(), normalizers.StripAccents()])
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                         pre_tokenizers.Metaspace(replacement="▁",
                                                                                  prepend_scheme="always")])
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=XLNET_SPECIALS, unk_token="<unk>",
                                      show_progress=False)
    trainer_tok.train_from_iterator(list(texts), trainer)
    vocab = [(piece, score) for piece, score in json.loads(trainer_tok.to_str())["model"]["vocab"]]
    tok = XLNetTokenizerFast(vocab=vocab, unk_id=XLNET_SPECIALS.index("<unk>"), padding_side="left",
                             model_max_length=512)
    assert tok.padding_side == "left" and tok.cls_token_id is not None
    return tok


def squad_sentences(dataset, limit: int = 4000) -> list[str]:
    """Up to `limit` sentences (contexts split on '. ' plus questions) from a SquadDataset, for tokenizer training."""
    out: list[str] = []
    seen: set[str] = set()
    for e in dataset.examples:
        if e.context not in seen:
            seen.add(e.context)
            out.extend(s for s in e.context.split(". ") if s)
        out.append(e.question)
        if len(out) >= limit:
            break
    return out[:limit]


# ---------------------------------------------------------------------------------------------------------------
# One small tokenizer of each kind the encoder families ship, wrapped in the family's fast tokenizer class with the
# special-token layout of its published checkpoints (issue 26).

FAMILY_KINDS = {"bert": "wordpiece", "electra": "wordpiece", "distilbert": "wordpiece", "roberta": "bpe",
                "modernbert": "bpe", "deberta-v2": "unigram", "albert": "unigram"}


def _wordpiece_vocab(texts: list[str], vocab_size: int) -> dict[str, int]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    return tok.get_vocab()


def _bpe_vocab(texts: list[str], vocab_size: int, specials: list[str]) -> tuple[dict[str, int], list[tuple]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _unigram_vocab(texts: list[str], vocab_size: int, specials: list[str], lowercase: bool) -> list[tuple[str, float]]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    steps = [normalizers.NFKD(), normalizers.StripAccents()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           unk_token=specials[1] if specials[1] != "[CLS]" else
                                                           "[UNK]", show_progress=False))
    return [(piece, score) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]


def build_family_tokenizer(family: str, texts: Iterable[str], vocab_size: int = 2000):
    """A fast tokenizer of `family`'s kind trained on `texts`: WordPiece, lower-cased (BERT, ELECTRA, DistilBERT —
    DistilBERT's model takes no token types); byte-level BPE (RoBERTa: `<s> q </s></s> c </s>`, trimmed offsets;
    ModernBERT: `[CLS] q [SEP] c [SEP]`, input_ids and attention_mask only); Unigram with Metaspace (DeBERTa-v3:
    `[CLS] q [SEP] c [SEP]`; ALBERT, lower-cased)."""
    from transformers import (AlbertTokenizerFast, BertTokenizerFast, DebertaV2TokenizerFast,
                              DistilBertTokenizerFast, ElectraTokenizerFast, RobertaTokenizerFast)

    texts = list(texts)
    if family in ("bert", "electra", "distilbert"):
        cls = {"bert": BertTokenizerFast, "electra": ElectraTokenizerFast, "distilbert": DistilBertTokenizerFast}
        return cls[family](vocab=_wordpiece_vocab(texts, vocab_size), do_lower_case=True, model_max_length=512)
    if family == "roberta":
        vocab, merges = _bpe_vocab(texts, vocab_size, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        return RobertaTokenizerFast(vocab=vocab, merges=merges, trim_offsets=True, model_max_length=512)
    if family == "modernbert":
        return _modernbert_tokenizer(texts, vocab_size)
    if family == "deberta-v2":
        vocab = _unigram_vocab(texts, vocab_size, ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], lowercase=False)
        return DebertaV2TokenizerFast(vocab=vocab, unk_id=3, model_max_length=512)
    if family == "albert":
        vocab = _unigram_vocab(texts, vocab_size, ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"], lowercase=True)
        return AlbertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
    raise ValueError(family)


def _modernbert_tokenizer(texts: list[str], vocab_size: int):
    """ModernBERT's published layout: a byte-level BPE (OLMo's) behind PreTrainedTokenizerFast, `[CLS] $A [SEP]`
    and `[CLS] $A [SEP] $B [SEP]`, input_ids and attention_mask only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    vocab, merges = _bpe_vocab(texts, vocab_size, specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    ids = {s: vocab[s] for s in specials}
    # TemplateProcessing alone, as in the published tokenizer.json: offsets keep a word's leading space (a
    # Sequence with a ByteLevel post-processor before it trims the first window's offsets but not the overflowing
    # ones', so run_qa.py's windows would disagree with each other).
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]", model_max_length=512,
                                   model_input_names=["input_ids", "attention_mask"])
