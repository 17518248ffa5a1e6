"""Where weights come from: the Hugging Face hub, a seeded initialisation, or a local checkpoint.

Local checkpoints may be in the timm/official layout or the mmpretrain/mmcls one; the layout is
detected from the keys and loading is strict, with messages that say what the file looks like.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from twins_deploy.errors import TwinsDeployError, UsageError
from twins_deploy.files import CHECKPOINT_SUFFIXES
from twins_deploy.models.twins import ModelSpec, Twins, checkpoint_filter_fn, describe_state_dict, guess_variant

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


def download_pretrained(spec: ModelSpec) -> Path:
    """The hub's safetensors for ``spec``, from the hub cache when present (HF_HUB_OFFLINE honoured)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    if spec.hub_id is None:
        raise UsageError(f"{spec.name} has no published weights: pass --weights random or --weights PATH")
    try:
        return Path(hf_hub_download(spec.hub_id, HUB_FILENAME))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise TwinsDeployError(
            f"pretrained weights for {spec.name} ({spec.hub_id}) are not in the hub cache and {why}: "
            "run once with network access, or pass --weights PATH to a local checkpoint") from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise TwinsDeployError(f"could not download {spec.hub_id}: {str(exc).splitlines()[0]}") from None


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file in timm's key layout, whatever layout it was saved in."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
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
    return checkpoint_filter_fn(state_dict)


def load_state_dict_strict(model: Twins, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names what the checkpoint looks like."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state_dict, strict=True)
        return
    name = model.spec.name
    try:
        found = describe_state_dict(state_dict)
    except ValueError as exc:
        raise TwinsDeployError(f"{origin} does not fit {name}: {exc}") from None
    ours = model.config
    if mismatched == ["head.weight", "head.bias"] and not (missing or unexpected):
        raise TwinsDeployError(
            f"{origin} has a {found['num_classes']}-class head but {name} is built with {ours.num_classes}: "
            f"pass --num-classes {found['num_classes']} to load it with its own head")
    guess = guess_variant(found)
    if found["family"] != ours.family or found["embed_dims"] != ours.embed_dims or found["depths"] != ours.depths:
        for stage, (theirs, mine) in enumerate(zip(found["embed_dims"], ours.embed_dims), start=1):
            if theirs != mine:
                detail = f"has embed dim {theirs} in stage {stage}"
                break
        else:
            detail = f"is a {found['family']} with depths {found['depths']}"
        looks = f"it looks like {guess.name}, not {name}" if guess else f"it is no published variant, not {name}"
        raise TwinsDeployError(f"{origin} {detail}: {looks}")
    problems = [f"{len(keys)} {what} (first: {keys[0]})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
    raise TwinsDeployError(f"{origin} does not fit {name}: {'; '.join(problems)}")


def load_weights(model: Twins, weights: str | Path, seed: int = 0) -> WeightsSource:
    """Fill ``model`` from 'pretrained' (hub), 'random' (seeded) or a checkpoint path."""
    if str(weights) == "random":
        model.init_weights(seed)
        return WeightsSource("random", f"seed={seed}")
    if str(weights) == "pretrained":
        path = download_pretrained(model.spec)
        source = WeightsSource("pretrained", model.spec.hub_id)
    else:
        path = Path(weights)
        source = WeightsSource("file", str(path))
    load_state_dict_strict(model, read_checkpoint(path), f"checkpoint {path.name}")
    return WeightsSource(source.kind, source.location, sha256_of(path))
