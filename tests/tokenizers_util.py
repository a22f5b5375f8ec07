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
