"""Files the engines write: atomically (never half-written), and cached for on-the-fly builds."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from twins_deploy.errors import UsageError


def cache_dir() -> Path:
    """Where engines built on the fly live: ``$TWINS_DEPLOY_CACHE`` or ``~/.cache/twins-deploy``."""
    return Path(os.environ.get("TWINS_DEPLOY_CACHE") or Path.home() / ".cache" / "twins-deploy")


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


def onnx_metadata(path: str | Path):
    """The twins-deploy ``ModelMetadata`` an ONNX file carries (preprocessing, classes, precision)."""
    import onnx

    from twins_deploy.errors import TwinsDeployError
    from twins_deploy.metadata import ModelMetadata

    if not Path(path).is_file():
        raise UsageError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TwinsDeployError(f"cannot read {path} as ONNX: {why}") from None
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, str(path))
