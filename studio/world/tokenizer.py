"""A CLIP tokenizer for the world's vocabulary: every known word is exactly one token.

CLIP's BPE splits a word into letters (the last one carrying ``</w>``) and applies merges in
rank order. A vocabulary without merges leaves words as letters, so prompts lose their meaning.
We add merges word by word, simulating the BPE after each one, and append a merge only for the
pair that BPE would see next: merges added later never change how earlier words split. Letters
and punctuation stay in the vocabulary, so any other word still tokenizes (as pieces).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

SPECIALS = ("<|startoftext|>", "<|endoftext|>")
CHARS = string.ascii_lowercase + string.digits + ",.!?'-:;()"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word, given merge ranks."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, _ = min(pairs)
        if rank == 1 << 30:
            break
        pair = next((parts[i], parts[i + 1]) for r, i in pairs if r == rank)
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A vocabulary and merge list under which each of ``words`` is one token."""
    vocab: dict[str, int] = {}
    for token in list(SPECIALS) + list(CHARS) + [c + "</w>" for c in CHARS]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        if not word or any(c not in CHARS for c in word):
            raise ValueError(f"word {word!r} has characters outside the tokenizer's alphabet")
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = _bpe(word, ranks)
    return vocab, merges


def write_tokenizer_files(words: list[str], folder: str | Path) -> Path:
    """Write vocab.json and merges.txt for ``words`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(words: list[str], folder: str | Path, max_length: int = 20):
    """A ``CLIPTokenizer`` over ``words`` (files written to ``folder``), checked word by word."""
    from transformers import CLIPTokenizer

    folder = write_tokenizer_files(words, folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    check_one_token_per_word(tokenizer, words)
    return tokenizer


def check_one_token_per_word(tokenizer, words: list[str]) -> None:
    """Raise if any word does not come out as exactly one token (plus start and end)."""
    for word in words:
        ids = tokenizer(word)["input_ids"]
        if len(ids) != 3:
            raise ValueError(f"tokenizer splits {word!r} into {len(ids) - 2} tokens: {tokenizer.convert_ids_to_tokens(ids)}")
