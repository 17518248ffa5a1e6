"""Files: which suffixes are checkpoints, and writing outputs atomically (one mechanism for all).

Torch-free so the models, the exporter, the engines and the CLI share it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from twins_deploy.errors import UsageError

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".msgpack")  # weights files we load (.msgpack: Flax)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix, for tools that check it); it replaces ``path``
    only if the block succeeds, so a crash or an error never leaves a half-written file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder for {path}: {exc.strerror}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
