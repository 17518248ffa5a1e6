"""Flax checkpoints read without jax or flax: ``flax.serialization.to_bytes(variables)`` files.

Such a file is plain msgpack: nested maps of names, arrays as msgpack ext type 1 holding a packed
``(shape, dtype name, raw bytes)`` (flax's ``_ndarray_to_bytes``); complex numbers and numpy
scalars have their own ext codes, which model weights never use. Paths are flattened to
``"Transformer_0/Attention_0/Dense_0/kernel"`` with the ``params`` collection unwrapped, and
``flax_to_torch`` turns kernels into torch layout, table-driven as in transformers'
``modeling_flax_pytorch_utils``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from twins_deploy.errors import TwinsDeployError, UsageError

FLAX_SUFFIXES = (".msgpack", ".flax")
_NDARRAY_EXT = 1  # flax.serialization._MsgpackExtType.ndarray


def _decode_ext(code: int, data: bytes):
    import msgpack

    if code != _NDARRAY_EXT:
        raise ValueError(f"msgpack ext type {code} is not an array")
    shape, dtype, buffer = msgpack.unpackb(data, raw=False)
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)


def read_flax_msgpack(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays of a Flax msgpack file by ``/``-joined path, the ``params`` collection unwrapped."""
    import msgpack

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        tree = msgpack.unpackb(path.read_bytes(), raw=False, ext_hook=_decode_ext, strict_map_key=False)
    except Exception as exc:  # not msgpack, truncated, or an ext that is no array
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TwinsDeployError(f"cannot read {path} as a Flax msgpack checkpoint: {first_line}") from None
    if not isinstance(tree, dict):
        raise TwinsDeployError(f"cannot read {path} as a Flax checkpoint: it holds a {type(tree).__name__}, not a tree")
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
        tree = tree["params"]
    arrays: dict[str, np.ndarray] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + "/")
            elif isinstance(value, np.ndarray):
                arrays[name] = value
    walk(tree, "")
    if not arrays:
        raise TwinsDeployError(f"{path} holds no arrays: is it a Flax checkpoint?")
    return arrays


def flax_to_torch(name: str, array: np.ndarray):
    """One Flax array in torch layout: Dense kernels (in, out) -> (out, in), Conv kernels
    (kh, kw, in, out) -> (out, in, kh, kw); LayerNorm ``scale`` is torch's ``weight``."""
    import torch

    leaf = name.rsplit("/", 1)[-1]
    if leaf == "kernel" and array.ndim == 2:
        array = array.T
    elif leaf == "kernel" and array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))  # a copy: msgpack's buffer is read-only


def is_flax_file(path: str | Path) -> bool:
    """A Flax msgpack file by suffix, or by its first byte (a msgpack map) when the suffix says nothing."""
    path = Path(path)
    if path.suffix.lower() in FLAX_SUFFIXES:
        return True
    if path.suffix.lower() in (".pt", ".pth", ".bin", ".safetensors"):
        return False
    with open(path, "rb") as handle:
        first = handle.read(1)
    return bool(first) and (first[0] & 0xF0 == 0x80 or first[0] in (0xDE, 0xDF))
