"""SigLIP's tokenizer, as the reference calls it for the class names.

MFuser_SIGLIP tokenizes each name with ``AutoProcessor.from_pretrained(
'google/siglip-large-patch16-384')(text=name, truncation=True, max_length=5,
padding='max_length')``: HF's SiglipTokenizer over that repository's SentencePiece model
(``spiece.model``). Restated here on the ``sentencepiece`` package alone (port of
transformers' tokenization_siglip.py): lower-case, strip ASCII punctuation, collapse
whitespace; encode "<unk>▁<text>" and drop the pieces of "<unk>" (the dummy-prefix trick
that makes the result independent of the model's add_dummy_prefix setting); truncate to
``max_length - 1``, append ``</s>``, pad with the pad id (``</s>`` as well) to
``max_length``. The vocabulary is not shipped (no licence to redistribute it here): pass
the file from the HF repository.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Sequence

import numpy as np

__all__ = ["SiglipTokenizer"]

_SPIECE_UNDERLINE = "\u2581"
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class SiglipTokenizer:
    """``tokenize(texts, context_length)`` -> int32 (N, context_length) token ids."""

    def __init__(self, model_file: str | os.PathLike, *, eos_token: str = "</s>",
                 pad_token: str = "</s>", unk_token: str = "<unk>"):
        import sentencepiece as spm

        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"{model_file}: no SentencePiece model here")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file}: not a SentencePiece model ({e})") from None
        self.unk_token = unk_token
        self.eos_id = self._special_id(eos_token)
        self.pad_id = self._special_id(pad_token)
        self._unk_length = len(self.sp.encode(unk_token, out_type=str))

    def _special_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            raise ValueError(f"the SentencePiece model has no {piece!r} piece: not SigLIP's")
        return int(i)

    @staticmethod
    def canonicalize(text: str) -> str:
        """Lower-case, no ASCII punctuation, single spaces, stripped (HF's canonicalize_text)."""
        text = text.lower().translate(_PUNCTUATION)
        return re.sub(r"\s+", " ", text).strip()

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without ``</s>``."""
        text = self.canonicalize(_SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " "))
        pieces = self.sp.encode(self.unk_token + text, out_type=str)
        if len(pieces) >= self._unk_length:
            pieces = pieces[self._unk_length:]
        return [self.sp.piece_to_id(p) for p in pieces]

    def tokenize(self, texts: str | Sequence[str], context_length: int) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        out = np.full((len(texts), context_length), self.pad_id, np.int32)
        for row, text in enumerate(texts):
            ids = self.encode(text)[: context_length - 1] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out
