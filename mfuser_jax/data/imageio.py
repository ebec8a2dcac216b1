"""Image and label file reading/writing with PIL only (no OpenCV)."""
from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

from mfuser_jax.errors import DataFileError


def read_image(path) -> np.ndarray:
    """RGB uint8 (H, W, 3)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - any decoder failure names the file
        raise DataFileError(f"cannot read image {path}: {e}") from None


def read_label(path) -> np.ndarray:
    """Single-channel uint8 label map (H, W): palette PNGs give their indices."""
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L"):
                arr = np.asarray(im)
            elif im.mode in ("I;16", "I;16B", "I", "I;16L"):
                arr = np.asarray(im).astype(np.int64)
                if arr.max(initial=0) > 255:
                    raise DataFileError(f"label {path} has values above 255")
                arr = arr.astype(np.uint8)
            else:
                raise DataFileError(
                    f"label {path} has image mode {im.mode!r}; expected a single-channel "
                    "(L or P) PNG of class ids")
    except DataFileError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataFileError(f"cannot read label {path}: {e}") from None
    return np.ascontiguousarray(arr, dtype=np.uint8)


def read_synthia_label(path) -> np.ndarray:
    """First channel of a SYNTHIA GT/LABELS PNG (16-bit RGB; class id, instance id, 0).

    PIL keeps only the high byte of 16-bit RGB PNGs; asking its decoder for the
    little-endian raw mode instead keeps the low byte, which holds the class id (< 256).
    8-bit files (e.g. re-saved copies) are read as they are.
    """
    try:
        im = Image.open(path)
        with im:
            if im.mode == "RGB" and im.tile and im.tile[0][3] in ("RGB;16B", ("RGB;16B",)):
                t = im.tile[0]
                im.tile = [t._replace(args="RGB;16L") if hasattr(t, "_replace")
                           else (t[0], t[1], t[2], "RGB;16L")]
                im.load()
                return np.ascontiguousarray(np.asarray(im)[:, :, 0])
            if im.mode in ("I;16", "I;16B", "I"):
                return (np.asarray(im).astype(np.int64) & 0xFF).astype(np.uint8)
            arr = np.asarray(im)
            return np.ascontiguousarray(arr[..., 0] if arr.ndim == 3 else arr, np.uint8)
    except Exception as e:  # noqa: BLE001
        raise DataFileError(f"cannot read SYNTHIA label {path}: {e}") from None


def write_label(path, label: np.ndarray) -> None:
    Image.fromarray(np.asarray(label, np.uint8), mode="L").save(path)


def write_png16_rgb(path, arr: np.ndarray) -> None:
    """Minimal 16-bit RGB PNG writer (SYNTHIA's label format; PIL cannot write it)."""
    arr = np.asarray(arr, dtype=">u2")
    h, w, c = arr.shape
    assert c == 3
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))
