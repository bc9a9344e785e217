"""The random presets' stand-in tokenizers (small vocabularies in the real transformers classes and layouts) and the
text-encoder configs that depend on them."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5Tokenizer

__all__ = ["build_clip_tokenizer", "build_t5_tokenizer", "clip_config", "t5_config"]

# CLIP's context length; SD3 reads it from tokenizer.model_max_length.
_CLIP_MAX_LENGTH = 77
# T5 accepts any length (relative position buckets); 512 is what SD3 checkpoints ship
# and keeps "longest" padding from warning for max_sequence_length up to 512.
_T5_MAX_LENGTH = 512
_T5_EXTRA_IDS = 100

# Words given their own tokens in the stand-in vocabularies, so that common prompts
# tokenize into roughly word-sized pieces as with the real tokenizers (anything else
# falls back to characters / bytes).
# fmt: off
_COMMON_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "at", "by", "photo", "picture",
    "painting", "portrait", "cat", "dog", "horse", "astronaut", "riding", "city",
    "sunset", "mountain", "forest", "river", "beach", "red", "blue", "green", "style",
    "high", "quality", "detailed", "realistic", "art",
)
# fmt: on

_T5_COMMON: dict[str, Any] = {
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}


def _word_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges that join each word left to right into an end-of-word token."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    # Longer words first, so their merges outrank those of words they contain ("at"
    # in "cat"); a few words may still split where chains collide, which is harmless.
    for word in sorted(words, key=len, reverse=True):
        symbols = [*word[:-1], word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            left += right
    return merges


def build_clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """A small byte-level BPE with the real CLIP layout and special tokens.

    Ids 0-255 are the byte alphabet in the same order as OpenAI's vocabulary, then the
    same with the ``</w>`` end-of-word suffix, then merged words, and the start/end
    tokens last (as 49406/49407 are in the real one).
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    # Sorted by code point this is exactly CLIP's bytes_to_unicode order.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = _word_merges(_COMMON_WORDS)
    tokens += [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token=pad_token,
        model_max_length=_CLIP_MAX_LENGTH,
    )


def build_t5_tokenizer() -> T5Tokenizer:
    """A small unigram vocabulary with the real T5 layout and special tokens.

    ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then pieces, then ``<extra_id_99>`` ..
    ``<extra_id_0>`` at the end like the sentencepiece model.
    """
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("▁", -3.0),
    ]
    # Whole words are cheaper than their spellings, so the unigram model prefers them.
    pieces += [("▁" + word, -4.0) for word in _COMMON_WORDS]
    pieces += [("▁" + c, -6.0) for c in string.ascii_lowercase + string.digits]
    pieces += [(c, -8.0) for c in string.ascii_letters + string.digits + string.punctuation]
    # Keep the first (cheapest) entry of pieces listed twice, e.g. "▁a".
    scores: dict[str, float] = {}
    for piece, score in pieces:
        scores.setdefault(piece, score)
    vocab = list(scores.items())
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(_T5_EXTRA_IDS))]
    return T5Tokenizer(vocab=vocab, extra_ids=_T5_EXTRA_IDS, model_max_length=_T5_MAX_LENGTH)


def clip_config(spec: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    kwargs: dict[str, Any] = {"vocab_size": len(tokenizer), **spec}
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError("CLIP vocab_size is smaller than the tokenizer's vocabulary")
    return CLIPTextConfig(
        **kwargs,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        layer_norm_eps=1e-5,
        # CLIPTextTransformer pools at the first eos_token_id in the input ids (any
        # value but the legacy 2), so it must be the tokenizer's real eos id.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def t5_config(spec: dict[str, Any], tokenizer: T5Tokenizer) -> T5Config:
    from transformers import T5Config

    kwargs: dict[str, Any] = {"vocab_size": len(tokenizer), **spec}
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError("T5 vocab_size is smaller than the tokenizer's vocabulary")
    return T5Config(
        **kwargs,
        **_T5_COMMON,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
