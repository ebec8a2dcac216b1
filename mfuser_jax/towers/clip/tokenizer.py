"""CLIP's byte-level BPE tokenizer, entirely offline.

Ported from openai/CLIP clip/simple_tokenizer.py (the copy MFuser uses lives in
models/backbones/utils.py): text is repaired with ftfy, HTML-unescaped twice, whitespace is
collapsed, the text lower-cased, split by CLIP's regex, every piece mapped byte -> printable
unicode symbol and merged by rank. Ids: 256 byte symbols, the same 256 with the end-of-word
marker ``</w>``, 48,894 merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

The merge list ships with the package (``assets/bpe_simple_vocab_16e6.txt.gz``, see the README
there for its provenance and license); nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
from collections.abc import Sequence

import numpy as np

__all__ = [
    "EOT_TOKEN",
    "SOT_TOKEN",
    "SimpleTokenizer",
    "bpe_path",
    "get_tokenizer",
    "tokenize",
]

SOT_TOKEN = 49406
EOT_TOKEN = 49407
_NUM_MERGES = 49152 - 256 - 2  # the file holds more lines; CLIP uses only this many
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"
_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)


def bpe_path() -> str:
    """Filesystem path of the bundled merge list."""
    ref = (importlib.resources.files("mfuser_jax.towers.clip") / "assets"
           / "bpe_simple_vocab_16e6.txt.gz")
    return str(ref)


@functools.lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> symbol table: printable Latin-1 bytes map to themselves,
    # the other 68 bytes to code points from 256 upwards, so no symbol is whitespace/control.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # dict order must be byte order of `printable` first, then the rest: ids depend on it
    ordered = {b: table[b] for b in printable}
    ordered.update({b: table[b] for b in range(256) if b not in ordered})
    return ordered


def _clean(text: str) -> str:
    import ftfy  # imported lazily: only tokenizing needs it
    import regex

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    # `regex`'s \s (Unicode White_Space) differs from str.split() on a few control chars
    return regex.sub(r"\s+", " ", text).strip()


class SimpleTokenizer:
    """CLIP's tokenizer over a BPE merge file (gzip text, first line a header)."""

    def __init__(self, path: str | None = None):
        import regex

        path = path or bpe_path()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        symbols = list(_byte_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [_SOT, _EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _byte_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self._cache = {_SOT: _SOT, _EOT: _EOT}
        self._pat = regex.compile(_PATTERN, regex.IGNORECASE)
        self._regex = regex
        if self.encoder[_SOT] != SOT_TOKEN or self.encoder[_EOT] != EOT_TOKEN:
            raise ValueError(f"{path}: not CLIP's BPE vocabulary (SOT/EOT ids differ)")

    def bpe(self, token: str) -> str:
        """Merge the symbols of one pre-token; returns space-separated BPE pieces."""
        if token in self._cache:
            return self._cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            # lowest-rank adjacent pair; stop when no adjacent pair is a known merge
            ranked = [
                (self.bpe_ranks[p], p)
                for p in zip(word[:-1], word[1:])
                if p in self.bpe_ranks
            ]
            if not ranked:
                break
            _, (first, second) = min(ranked)
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without SOT/EOT."""
        ids = []
        for piece in self._regex.findall(self._pat, _clean(text).lower()):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(symbols).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> SimpleTokenizer:
    """The tokenizer over the bundled vocabulary, built once per process."""
    return SimpleTokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = 77, truncate: bool = False
) -> np.ndarray:
    """Token ids (len(texts), context_length) int32: [SOT] text [EOT], zero padded.

    A text longer than ``context_length`` raises ValueError unless ``truncate``, which
    keeps the first ``context_length`` ids and puts EOT last (as CLIP's ``tokenize``).
    """
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    out = np.zeros((len(texts), context_length), dtype=np.int32)
    for row, text in enumerate(texts):
        ids = [SOT_TOKEN] + tok.encode(text) + [EOT_TOKEN]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(
                    f"text {text!r} needs {len(ids)} tokens, more than context_length="
                    f"{context_length}; shorten it or pass truncate=True"
                )
            ids = ids[:context_length]
            ids[-1] = EOT_TOKEN
        out[row, : len(ids)] = ids
    return out
