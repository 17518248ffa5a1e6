"""Files: which suffixes are checkpoints, and writing outputs atomically (one mechanism for all).

Torch-free so the models, the exporter, the engines and the CLI share it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from twins_deploy.errors import UsageError

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".msgpack")  # weights files we load (.msgpack: Flax)
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def output_mode(path: Path, directory: bool = False) -> int:
    """The mode ``path`` should get: its own when it exists (a user's chmod survives an overwrite),
    else what ``open(path, "w")`` (or ``mkdir``) would give under the caller's umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return (0o777 if directory else 0o666) & ~current_umask()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def cleanup_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit instead of killing the process on the spot,
    so ``finally`` clauses remove temporary files. Only from the main thread, and only where no
    handler of the caller's is installed (nested blocks keep the outer one's)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _with_parent(path: str | Path) -> Path:
    """``path`` as a Path, its folder created (a one-line error when it cannot be)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder for {path}: {exc.strerror}") from None
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix, for tools that check it); it replaces ``path``
    only if the block succeeds (fsync, then rename), with the mode an ordinary write would give, so
    an error, Ctrl-C or SIGTERM never leaves a half-written file, a temp file, or a damaged earlier one."""
    path = _with_parent(path)
    with cleanup_on_sigterm():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            with open(tmp, "rb") as handle:  # writers that do not fsync themselves: durable before the rename
                os.fsync(handle.fileno())
            os.chmod(tmp, output_mode(path))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """``atomic_output`` for a folder of files (Parquet parts): a temporary folder next to ``path``,
    its files fsynced and given ordinary modes, then renamed into place only if the block succeeds.
    An earlier folder at ``path`` is moved aside first and deleted after (two renames, not one:
    a crash between them leaves it as a hidden ``.<name>.old`` folder beside, never half-written)."""
    path = _with_parent(path)
    with cleanup_on_sigterm():
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        old = tmp.with_name(f".{path.name}.old")
        try:
            yield tmp
            for file in tmp.iterdir():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
                os.chmod(file, output_mode(path / file.name))
            os.chmod(tmp, output_mode(path, directory=True))
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
