"""Frame ids drawn into pixels, to follow frames through a lossy video path.

A 4x4 grid of black/white cells covers the picture: 11 bits of id and a 5-bit check (id mod 31),
big enough to survive VP8/H.264 at low bitrates. ``read`` returns None when the check fails.
"""

from __future__ import annotations

import numpy as np

BITS, CHECK = 11, 31
MAX_ID = 1 << BITS


def draw(frame_id: int, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3] carrying ``frame_id % 2048``."""
    value = frame_id % MAX_ID
    word = value | ((value % CHECK) << BITS)
    bits = np.array([(word >> i) & 1 for i in range(16)], dtype=np.uint8).reshape(4, 4) * 255
    cells = np.kron(bits, np.ones((height // 4, width // 4), dtype=np.uint8))
    img = np.zeros((height, width, 3), np.uint8)
    img[: cells.shape[0], : cells.shape[1]] = cells[..., None]
    return img


def read(img: np.ndarray) -> int | None:
    h, w = img.shape[0] // 4, img.shape[1] // 4
    word = 0
    for i in range(16):
        r, c = divmod(i, 4)
        cell = img[r * h + h // 4 : r * h + 3 * h // 4, c * w + w // 4 : c * w + 3 * w // 4]
        if cell.mean() > 127:
            word |= 1 << i
    value, check = word & (MAX_ID - 1), word >> BITS
    return value if value % CHECK == check else None
