"""The perceptual hash the filter's near-duplicate rule compares and the synthetic corpus plants:
`phash(image)`, a 64-bit DCT hash (grayscale, 32x32, 2-D DCT-II, the 8x8 lowest frequencies compared with
their median), returned as a signed int64 so it fits a parquet int64; `hamming(a, b)`, the bits in which
two hashes differ."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn


def phash(image: Image.Image, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """DCT perceptual hash of `image` as a signed 64-bit int (bit i = coefficient i > median)."""
    side = hash_size * highfreq_factor
    gray = image.convert("L").resize((side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)
    low = dctn(pixels, type=2, norm="ortho")[:hash_size, :hash_size]
    bits = (low > np.median(low)).reshape(-1)
    return int(np.frombuffer(np.packbits(bits).tobytes(), dtype=">u8")[0].astype(np.int64))


def hamming(a: int, b: int) -> int:
    return int(np.bitwise_count(np.array(a, dtype=np.int64).view(np.uint64)
                                ^ np.array(b, dtype=np.int64).view(np.uint64)))
