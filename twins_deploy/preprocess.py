"""timm's eval transform in numpy and Pillow, so services need no torch or torchvision.

Resize the short side to size / crop_pct (bicubic, antialiased as Pillow always is), centre crop,
scale to [0, 1], normalise with the model's mean/std; NCHW float32 out. EXIF rotation is applied
and grayscale/RGBA/palette images are converted to RGB first.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.metadata import ModelMetadata

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageTooLarge(TwinsDeployError):
    """An image over Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``): likely a decompression bomb."""


def check_pixels(width: int, height: int, name: str) -> None:
    """Refuse an image over Pillow's pixel limit before it is decoded (Pillow only warns below twice it)."""
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"image {name} is {width}x{height}: more than the {Image.MAX_IMAGE_PIXELS:,} pixels "
                            "an image may have")


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """An RGB image from a path, encoded bytes or a PIL image, upright per its EXIF orientation."""
    if isinstance(source, Image.Image):
        image = source
    else:
        name = "bytes" if isinstance(source, (bytes, bytearray)) else str(source)
        try:
            with warnings.catch_warnings():  # Pillow warns over the limit; check_pixels refuses instead
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            check_pixels(image.width, image.height, name)  # from the header, before decoding a bomb
            image.load()
        except FileNotFoundError:
            raise TwinsDeployError(f"image not found: {name}") from None
        except TwinsDeployError:
            raise
        except Image.DecompressionBombError:
            raise ImageTooLarge(f"image {name} has more than {Image.MAX_IMAGE_PIXELS:,} pixels") from None
        except Exception as exc:
            raise TwinsDeployError(f"cannot decode image {name}: {exc}") from None
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey: Pillow's convert would clip at 255
        high_byte = np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8  # as Pillow reads 16-bit RGB
        image = Image.fromarray(high_byte.astype(np.uint8), "L")
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def preprocess(image: Image.Image, meta: ModelMetadata) -> np.ndarray:
    """One RGB image to a (3, H, W) float32 array, exactly as timm's eval transform does it."""
    height, width = meta.input_size
    resample = _RESAMPLE.get(meta.interpolation, Image.BICUBIC)
    if height == width:  # timm resizes the short side for square inputs
        scale = math.floor(height / meta.crop_pct)
        w, h = image.size
        new = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    else:
        new = (math.floor(width / meta.crop_pct), math.floor(height / meta.crop_pct))
    image = image.resize(new, resample)
    left = int(round((image.width - width) / 2.0))
    top = int(round((image.height - height) / 2.0))
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(meta.mean, np.float32)) / np.asarray(meta.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def parse_preprocessing(mean: str | None = None, std: str | None = None, interpolation: str | None = None,
                        crop_pct: float | None = None) -> dict:
    """Preprocessing overrides as typed on a command line ("0.5,0.5,0.5"), checked; absent ones left out."""
    values: dict = {}
    for key, text in (("mean", mean), ("std", std)):
        if text is None:
            continue
        try:
            channels = tuple(float(v) for v in text.split(","))
        except ValueError:
            channels = ()
        if len(channels) != 3 or (key == "std" and min(channels) <= 0):
            raise UsageError(f"--{key} takes three comma-separated numbers{' above 0' if key == 'std' else ''}, "
                             f"like 0.5,0.5,0.5; got {text!r}")
        values[key] = channels
    if interpolation is not None:
        if interpolation.lower() not in _RESAMPLE:
            raise UsageError(f"--interpolation must be one of {', '.join(_RESAMPLE)}, got {interpolation!r}")
        values["interpolation"] = interpolation.lower()
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise UsageError(f"--crop-pct must be in (0, 1], got {crop_pct}")
        values["crop_pct"] = float(crop_pct)
    return values


def top_k(logits: np.ndarray, class_names: tuple[str, ...] | list[str], k: int = 5) -> list[list[dict]]:
    """Softmax probabilities of the k best classes per row: ``{"class_id", "name", "prob"}``."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"class_id": int(c), "name": class_names[c] if c < len(class_names) else str(int(c)),
              "prob": float(p[c])} for c in row] for p, row in zip(probs, best)]
