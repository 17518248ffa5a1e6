"""Serving on Ray Serve: an HTTP ingress and the model deployment, for any exported file.

    twins-deploy serve svt-s-224x224.onnx                     # local Ray on 127.0.0.1, http://127.0.0.1:8000
    serve run twins_deploy.serving:app model=/models/svt-s.onnx max_batch=8     # Serve's own CLI or YAML

``build_app(path, ServeOptions(...))`` is the Python API; ``app(args)`` is the builder Serve's
``import_path`` calls with the YAML's ``args`` (strings from ``serve run``, typed from YAML).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from twins_deploy.errors import UsageError
from twins_deploy.serving.options import ServeOptions

__all__ = ["ServeOptions", "app", "build_app"]


def build_app(model: str | Path, options: ServeOptions | None = None):
    """A Serve application serving ``model`` (an exported .onnx file or an OpenVINO IR .xml)."""
    from twins_deploy.serving.deployments import application
    from twins_deploy.serving.model_file import ModelFile

    options = options or ServeOptions()
    files = ModelFile.read(model)
    return application(files, files.describe(options.name), options)


def app(args: dict):
    """Serve's application builder: ``args`` holds ``model`` (the file's path where the app is built)
    and any ``ServeOptions`` field, e.g. ``{"model": "/models/svt-s.onnx", "max_batch": 8}``."""
    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise UsageError("the application needs 'model': the path of an exported .onnx file or an OpenVINO IR")
    fields = {f.name: f for f in dataclasses.fields(ServeOptions)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r}; the options are: model, {', '.join(fields)}")
    return build_app(model, ServeOptions(**{key: _typed(fields[key], value) for key, value in args.items()}))


def _typed(field: dataclasses.Field, value):
    """A value as its field's type: ``serve run key=value`` passes strings."""
    if not isinstance(value, str) or "str" in str(field.type):
        return value
    kind = float if "float" in str(field.type) else int
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"{field.name} must be a number, got {value!r}") from None
