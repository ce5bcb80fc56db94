"""Image decode / resize / re-encode with Pillow (ImageNet-style sources for the image MViT).

Pillow rather than torchvision.io: it reads the size from the header before decoding, so an image
whose pixel count would exhaust a worker's memory (a decompression bomb) is refused, not decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.data.video import VideoError, target_size

MAX_PIXELS = 100_000_000  # a 10k x 10k photo; larger inputs are quarantined


def _open(data: bytes) -> Image.Image:
    if not data:
        raise VideoError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise VideoError("image too large", f"{width}x{height} pixels > {MAX_PIXELS}")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise VideoError("image too large", str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise VideoError("undecodable image", str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return image


def decode_image(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB, upright (EXIF orientation applied)."""
    return np.asarray(ImageOps.exif_transpose(_open(data)).convert("RGB"))


def encode_image(data: bytes, *, short_side: int, min_short_side: int = 0, quality: int = 90) -> tuple[bytes, dict]:
    """decode -> upright (EXIF orientation) -> resize to the short side -> JPEG. Deterministic bytes."""
    image = ImageOps.exif_transpose(_open(data)).convert("RGB")
    width, height = image.size
    new_w, new_h = target_size(width, height, short_side, min_short_side)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    meta = {"frames": 1, "fps": 0, "height": new_h, "width": new_w, "source_width": width, "source_height": height}
    return buffer.getvalue(), meta
