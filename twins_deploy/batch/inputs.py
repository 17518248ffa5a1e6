"""What a batch job reads: local files, folders and globs as ``infer`` takes them, list files, and URIs.

Inputs are listed once, on the driver; the workers read the bytes. A URI (``s3://``, ``gs://``,
``file://``, ``hdfs://``...) goes through pyarrow's filesystems, so a worker needs its credentials
but not the files on its disk. A local path is made absolute for the workers, whose working folder
is not the driver's; the output keeps the path as the user wrote it.
"""
from __future__ import annotations

import fnmatch
import functools
import glob
import os
from pathlib import Path
from typing import Sequence

from twins_deploy.engines.predict import InputItem, collect_inputs
from twins_deploy.errors import TwinsDeployError, UsageError

LIST_SUFFIX = ".txt"  # an input ending in .txt lists one path or URI per line


def is_uri(path: str) -> bool:
    return "://" in path


@functools.lru_cache(maxsize=16)
def _filesystem(uri: str):
    """pyarrow's filesystem for ``scheme://authority`` (one per bucket and process) and its path prefix."""
    try:
        from pyarrow import fs
    except ImportError:
        raise UsageError("reading URIs needs pyarrow: pip install 'twins-deploy[batch]'") from None
    filesystem, _ = fs.FileSystem.from_uri(uri)
    return filesystem


def _split(uri: str) -> tuple[object, str, str]:
    """(filesystem, path inside it, the prefix that turns such a path back into a URI)."""
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return _filesystem("file:///"), rest, "file://"
    authority = rest.split("/", 1)[0]
    from pyarrow import fs

    filesystem = _filesystem(f"{scheme}://{authority}")
    _, path = fs.FileSystem.from_uri(uri)
    return filesystem, path, f"{scheme}://"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _list_uri(uri: str) -> list[InputItem]:
    """A file, a folder (recursive, images only) or a glob (``*`` also crosses ``/``) behind a URI."""
    from pyarrow import fs

    from twins_deploy.preprocess import IMAGE_SUFFIXES

    try:
        filesystem, path, prefix = _split(uri)
        if glob.has_magic(path):
            base = path[:min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
            found = sorted(i.path for i in infos if i.type == fs.FileType.File and fnmatch.fnmatchcase(i.path, path))
            return [InputItem(prefix + p) for p in found] or [InputItem(uri, "no file matches this pattern")]
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.File:
            return [InputItem(uri)]
        if info.type == fs.FileType.Directory:
            infos = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
            found = sorted(i.path for i in infos
                           if i.type == fs.FileType.File and Path(i.path).suffix.lower() in IMAGE_SUFFIXES)
            return [InputItem(prefix + p) for p in found] or [InputItem(uri, "folder holds no images")]
        return [InputItem(uri, "file not found")]
    except UsageError:
        raise
    except Exception as exc:  # no credentials, unknown scheme, unreachable store: this input fails, not the job
        return [InputItem(uri, f"cannot list {uri}: {_first_line(exc)}")]


def _list_file(path: str) -> list[InputItem]:
    """The inputs a ``.txt`` file names, one per line (blank lines and ``#`` comments skipped)."""
    try:
        text = read_bytes(path).decode("utf-8")
    except (TwinsDeployError, UnicodeDecodeError) as exc:
        return [InputItem(path, f"cannot read the list {path}: {exc}")]
    lines = [line.strip() for line in text.splitlines()]
    return [InputItem(line) for line in lines if line and not line.startswith("#")] \
        or [InputItem(path, "the list names no inputs")]


def list_inputs(patterns: Sequence[str]) -> list[InputItem]:
    """Every input the patterns name, in order: local ones as ``infer`` lists them, ``.txt`` files as the
    paths they list, URIs through pyarrow; what cannot be found is an item with its error."""
    items: list[InputItem] = []
    for pattern in patterns:
        if is_uri(pattern):
            items += _list_file(pattern) if pattern.lower().endswith(LIST_SUFFIX) else _list_uri(pattern)
        elif pattern.lower().endswith(LIST_SUFFIX) and Path(pattern).is_file():
            items += _list_file(pattern)
        else:
            items += collect_inputs([pattern])
    return items


def worker_path(path: str) -> str:
    """Where a worker reads an input: a URI as it is, a local path made absolute."""
    return path if is_uri(path) else os.path.abspath(path)


def read_bytes(path: str) -> bytes:
    """The bytes of a local file or a URI; a one-line ``TwinsDeployError`` when they cannot be read."""
    try:
        if is_uri(path):
            filesystem, inner, _ = _split(path)
            with filesystem.open_input_stream(inner) as stream:
                return stream.read()
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise TwinsDeployError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise TwinsDeployError(f"{path} is a folder, not an image") from None
    except UsageError:
        raise
    except Exception as exc:
        raise TwinsDeployError(f"cannot read {path}: {_first_line(exc)}") from None
