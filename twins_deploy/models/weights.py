"""Where weights come from: the Hugging Face hub, a seeded initialisation, or a local checkpoint.

Each family reads its own files into its model's keys (``Family.read_checkpoint``, beside the
model); loading is strict for all, with messages that say what the file looks like.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.files import CHECKPOINT_SUFFIXES

HUB_FILENAME = "model.safetensors"


@dataclass(frozen=True)
class WeightsSource:
    """What a model's weights are, for reports and ONNX metadata."""

    kind: str  # "pretrained", "random" or "file"
    location: str  # hub id, "seed=N" or the file path
    sha256: str | None = None

    def __str__(self) -> str:
        return self.location if self.kind == "file" else f"{self.kind}:{self.location}"


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


HUB_CONNECT_TIMEOUT_S = 2.0  # how long to wait for the hub before saying it cannot be reached


def download_pretrained(spec) -> Path:
    """The hub's safetensors for ``spec``, from the hub cache when present (HF_HUB_OFFLINE honoured).

    Without a cached copy, one short TCP connection to the hub is tried first, so a machine without
    network gets our one-line error in seconds instead of huggingface_hub's retries.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    if spec.hub_id is None:
        raise UsageError(f"{spec.name} has no published weights: pass --weights random or --weights PATH")
    cached = try_to_load_from_cache(spec.hub_id, HUB_FILENAME)
    if isinstance(cached, str):
        return Path(cached)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    why = "HF_HUB_OFFLINE is set" if offline else f"the hub ({constants.ENDPOINT}) cannot be reached"
    missing = (f"pretrained weights for {spec.name} ({spec.hub_id}) are not in the hub cache and {why}: "
               "run once with network access, or pass --weights PATH to a local checkpoint")
    if offline or not _reachable(constants.ENDPOINT):
        raise TwinsDeployError(missing)
    try:
        return Path(hf_hub_download(spec.hub_id, HUB_FILENAME))
    except LocalEntryNotFoundError:
        raise TwinsDeployError(missing) from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise TwinsDeployError(f"could not download {spec.hub_id}: {str(exc).splitlines()[0]}") from None


def _reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the hub's host opens within HUB_CONNECT_TIMEOUT_S."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def load_torch_file(path: str | Path) -> dict:
    """The dict a PyTorch checkpoint file holds (``weights_only``: a file that holds code is refused)."""
    from twins_deploy.models.flax_msgpack import is_flax_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    if is_flax_file(path):
        raise UsageError(f"{path} is a Flax msgpack checkpoint, not a PyTorch one: load it with a vit-flax model "
                         "(see 'twins-deploy models')")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise UsageError(f"{path} is not a checkpoint: expected one of {', '.join(CHECKPOINT_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or pickled with foreign classes
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TwinsDeployError(f"cannot read checkpoint {path}: {first_line}") from None
    if not isinstance(state_dict, dict):
        raise TwinsDeployError(f"cannot read checkpoint {path}: it holds a {type(state_dict).__name__}, not a state_dict")
    return state_dict


def unwrap_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """The tensors of a training checkpoint: ``model``/``state_dict`` nesting unwrapped, DDP's
    ``module.`` prefix stripped."""
    for wrapper in ("state_dict", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    return {k.removeprefix("module."): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def load_state_dict_strict(model, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names what the checkpoint looks like."""
    from twins_deploy.models.registry import family_of

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state_dict, strict=True)
        return
    explain = family_of(model.spec).explain_mismatch
    message = explain(model, state_dict, origin) if explain else None
    if message:
        raise TwinsDeployError(message)
    problems = [f"{len(keys)} {what} (first: {keys[0]})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected)) if keys]
    if mismatched:
        key = mismatched[0]
        problems.append(f"{len(mismatched)} shape mismatches (first: {key} is {tuple(state_dict[key].shape)} in the "
                        f"file, {tuple(expected[key].shape)} in the model)")
    raise TwinsDeployError(f"{origin} does not fit {model.spec.name}: {'; '.join(problems)}")


def load_weights(model, weights: str | Path, seed: int = 0) -> WeightsSource:
    """Fill ``model`` from 'pretrained' (hub), 'random' (seeded) or a checkpoint path."""
    from twins_deploy.models.registry import family_of

    if str(weights) == "random":
        model.init_weights(seed)
        return WeightsSource("random", f"seed={seed}")
    family = family_of(model.spec)
    if str(weights) == "pretrained":
        if model.spec.hub_id is None:
            raise UsageError(f"{model.spec.name} has no pretrained weights ({family.library} publishes none): "
                             f"pass --weights random or --weights PATH ({family.weights_format})")
        path = download_pretrained(model.spec)
        source = WeightsSource("pretrained", model.spec.hub_id)
    else:
        path = Path(weights)
        source = WeightsSource("file", str(path))
    load_state_dict_strict(model, family.read_checkpoint(path), f"checkpoint {path.name}")
    return WeightsSource(source.kind, source.location, sha256_of(path))
