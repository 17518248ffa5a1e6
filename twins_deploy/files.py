"""Files: which suffixes are checkpoints, and writing outputs atomically (one mechanism for all).

Torch-free so the models, the exporter, the engines and the CLI share it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
import threading
from pathlib import Path
from typing import Callable, Iterator

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


_PENDING: set[Callable[[], None]] = set()  # how to undo each output being written, for the SIGTERM handler


def _end_on_sigterm(signum, frame) -> None:
    """Undo every output being written, then end the process as SIGTERM does. Raising SystemExit into the
    code that was running instead is not safe: a weakref callback swallowed it (the export went on and
    wrote its file), and between a temp file's creation and its ``try`` it left the file behind."""
    for undo in list(_PENDING):
        with contextlib.suppress(OSError):
            undo()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(128 + signum)  # only if the signal has not ended the process already


@contextlib.contextmanager
def _sigterm_handled() -> Iterator[None]:
    """While the block runs, SIGTERM undoes the outputs being written before it ends the process. Only from
    the main thread, and only where no handler of the caller's is installed (a server's own stops it
    gracefully; nested blocks keep the outer one's)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _end_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _undone_at_exit(undo: Callable[[], None]) -> Iterator[None]:
    """``undo`` runs when the block ends, however it ends, and from the SIGTERM handler. It is registered
    before the block creates anything, so it must accept finding nothing, or finding the output done."""
    with _sigterm_handled():
        _PENDING.add(undo)
        try:
            yield
        finally:
            try:
                undo()
            finally:
                _PENDING.discard(undo)


def _temp_name(path: Path) -> Path:
    """A hidden name beside ``path``, chosen before anything is created, so it can be undone at any moment."""
    return path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")


def _with_parent(path: str | Path) -> Path:
    """``path`` as a Path, its folder created (a one-line error when it cannot be)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder for {path}: {exc.strerror}") from None
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path, companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix, for tools that check it); it replaces ``path``
    only if the block succeeds (fsync, then rename), with the mode an ordinary write would give, so
    an error, Ctrl-C or SIGTERM never leaves a half-written file, a temp file, or a damaged earlier one.
    ``companions``: suffixes of files the writer puts beside the temp path (an IR's ``.bin``), renamed
    into place before ``path`` itself, so a reader never finds ``path`` without them."""
    path = _with_parent(path)
    tmp = _temp_name(path)
    moves = [(tmp.with_suffix(suffix), path.with_suffix(suffix)) for suffix in companions] + [(tmp, path)]

    def undo() -> None:
        for written, _ in moves:
            written.unlink(missing_ok=True)

    with _undone_at_exit(undo):
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        yield tmp
        for written, final in moves:
            with open(written, "rb") as handle:  # writers that do not fsync themselves: durable before the rename
                os.fsync(handle.fileno())
            os.chmod(written, output_mode(final))
        for written, final in moves:
            os.replace(written, final)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """``atomic_output`` for a folder (Parquet parts, a Triton model): a temporary folder next to ``path``,
    its files fsynced and given ordinary modes, then renamed into place only if the block succeeds.
    An earlier folder at ``path`` is moved aside first and deleted after (two renames, not one: an
    error or SIGTERM between them puts it back)."""
    path = _with_parent(path)
    tmp = _temp_name(path)
    old = tmp.with_name(tmp.name + ".old")

    def undo() -> None:
        if old.exists() and not path.exists():  # ended between the two renames: the earlier folder goes back
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

    with _undone_at_exit(undo):
        tmp.mkdir(mode=0o700)
        yield tmp
        for item in sorted(tmp.rglob("*")):
            if item.is_file():
                with open(item, "rb") as handle:
                    os.fsync(handle.fileno())
            os.chmod(item, output_mode(path / item.relative_to(tmp), directory=item.is_dir()))
        os.chmod(tmp, output_mode(path, directory=True))
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
