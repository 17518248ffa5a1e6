"""The command line prints its own lines only: the libraries underneath (torch, NNCF, OpenVINO,
onnxruntime, huggingface_hub) stay quiet unless ``--verbose`` asks for them.

Their chatter is Python logging (torch's glog-style "W1130 ... cpp_extension.py:183] No CUDA runtime
is found", NNCF's INFO lines, which NNCF sends to stdout where ``--json`` goes), Python warnings, and
torch's C++ log, read from ``TORCH_CPP_LOG_LEVEL`` when torch is imported. Library errors still show.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator

QUIET_ENV = {"TORCH_CPP_LOG_LEVEL": "ERROR"}  # read at import: set before the commands' lazy imports


@contextlib.contextmanager
def library_logs(verbose: bool) -> Iterator[None]:
    """Within the block, the libraries' warnings and log lines below ERROR are dropped unless ``verbose``;
    everything is restored after (the process-wide logging switch, warning filters, environment)."""
    if verbose:
        yield
        return
    previous = logging.root.manager.disable
    added = {key: value for key, value in QUIET_ENV.items() if key not in os.environ}  # a user's setting wins
    os.environ.update(added)
    logging.disable(max(previous, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
        for key in added:
            os.environ.pop(key, None)
