"""CLIP tokenizer: our port vs HF's CLIPTokenizer (tokenizers backend) on the same BPE data."""

import gzip
import json

import numpy as np
import pytest

from mfuser_jax.towers.clip import tokenizer as tk

CITYSCAPES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]
ODD = [
    "Traffic   Light", "  SKY  ", "it's the rider's bike", "they'll've gone", "naïve café",
    "100 km/h, 3.5m!!", "C3PO??", "tab\tand\nnewline", "emoji 🚗🚦 car", "日本語のテキスト",
    "ünïcödé ÀÉÎ", "a-b_c+d=e", "x" * 40,
]


def _bytes_to_unicode():
    # Restated here (not imported from our module) so the HF vocabulary is built independently.
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    with gzip.open(tk.bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    d = tmp_path_factory.mktemp("hf_clip_tok")
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    vocab_map = json.loads((d / "vocab.json").read_text())
    merge_lines = [tuple(m.split()) for m in (d / "merges.txt").read_text().split("\n")[1:-1]]
    return transformers.CLIPTokenizer(vocab=vocab_map, merges=merge_lines)


def _hf_ids(hf, text, context_length):
    ids = hf(text)["input_ids"]
    out = np.zeros(context_length, np.int32)
    out[: len(ids)] = ids
    return out


def test_special_ids_and_vocab_size():
    t = tk.get_tokenizer()
    assert len(t.encoder) == 49408
    assert t.encoder["<|startoftext|>"] == tk.SOT_TOKEN == 49406
    assert t.encoder["<|endoftext|>"] == tk.EOT_TOKEN == 49407


@pytest.mark.parametrize("texts", [CITYSCAPES, ODD], ids=["cityscapes", "odd"])
def test_matches_hf(hf_tokenizer, texts):
    ours = tk.tokenize(texts, context_length=77)
    assert ours.dtype == np.int32 and ours.shape == (len(texts), 77)
    for row, text in zip(ours, texts):
        np.testing.assert_array_equal(row, _hf_ids(hf_tokenizer, text, 77), err_msg=text)


def test_cityscapes_names_fit_mfuser_context():
    # MFuser tokenizes each class name to 5 tokens without truncation
    ids = tk.tokenize(CITYSCAPES, context_length=5)
    assert ids.shape == (19, 5)
    assert (ids[:, 0] == tk.SOT_TOKEN).all()
    eot = ids.argmax(-1)
    assert (ids[np.arange(19), eot] == tk.EOT_TOKEN).all()
    for row, e in zip(ids, eot):
        assert (row[e + 1 :] == 0).all()
    # "traffic light" is two word pieces: SOT traffic light EOT 0
    assert eot[CITYSCAPES.index("traffic light")] == 3
    assert tk.get_tokenizer().decode(ids[6, 1:3]).strip() == "traffic light"


def test_truncation_and_error():
    long = "one two three four five six seven"
    with pytest.raises(ValueError, match="context_length=5"):
        tk.tokenize(long, context_length=5)
    ids = tk.tokenize(long, context_length=5, truncate=True)
    full = tk.tokenize(long, context_length=77)
    np.testing.assert_array_equal(ids[0, :4], full[0, :4])
    assert ids[0, 4] == tk.EOT_TOKEN


def test_cleaning():
    # html entities (unescaped twice), ftfy mojibake repair, whitespace and case
    same = lambda a, b: np.testing.assert_array_equal(tk.tokenize(a), tk.tokenize(b))  # noqa: E731
    same("rock &amp;amp; roll", "rock & roll")
    same("cafÃ©", "café")
    same("  Traffic \n\t SIGN ", "traffic sign")
    assert tk.tokenize("") [0, :3].tolist() == [tk.SOT_TOKEN, tk.EOT_TOKEN, 0]
