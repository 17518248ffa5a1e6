"""Artifacts the engines read and cache: where on-the-fly builds live, what an ONNX file says of itself."""
from __future__ import annotations

import os
from pathlib import Path

from twins_deploy.errors import UsageError


def cache_dir() -> Path:
    """Where engines built on the fly live: ``$TWINS_DEPLOY_CACHE`` or ``~/.cache/twins-deploy``."""
    return Path(os.environ.get("TWINS_DEPLOY_CACHE") or Path.home() / ".cache" / "twins-deploy")


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
