"""The Twins model zoo: names, configurations and ``create_model``."""
from __future__ import annotations

from pathlib import Path

from twins_deploy.errors import UsageError
from twins_deploy.models.twins import (
    MODELS, OUTPUTS, ModelSpec, Twins, TwinsConfig, checkpoint_filter_fn, to_size, with_classes, _ALIASES,
)
from twins_deploy.models.weights import WeightsSource, load_weights


def resolve_spec(name: str | TwinsConfig | ModelSpec) -> ModelSpec:
    """A registered variant by any of its names (``svt-s``, ``twins_svt_small``, ``alt_gvt_small``)."""
    if isinstance(name, ModelSpec):
        return name
    if isinstance(name, TwinsConfig):
        return ModelSpec("custom", name)
    spec = _ALIASES.get(name.lower().strip())
    if spec is None:
        import difflib

        close = difflib.get_close_matches(name.lower(), list(_ALIASES), n=1)
        hint = f" (did you mean {_ALIASES[close[0]].name}?)" if close else ""
        raise UsageError(f"unknown model {name!r}{hint}: choose one of {', '.join(MODELS)}")
    return spec


def create_model(name: str | TwinsConfig | ModelSpec, *, weights: str | Path = "random",
                 img_size: int | tuple[int, int] | str | None = None, num_classes: int | None = None,
                 output: str = "logits", seed: int = 0) -> Twins:
    """Build a Twins model for one input size and fill its weights; returns it in eval mode.

    ``weights``: 'pretrained' (hub), 'random' (seeded) or a checkpoint path in any published layout.
    ``model.weights_source`` records where the weights came from (with the file's sha256).
    """
    spec = with_classes(resolve_spec(name), num_classes)
    try:
        model = Twins(spec.config, img_size or spec.input_size, output=output, spec=spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model.weights_source = load_weights(model, weights, seed)
    return model.eval()


def count_parameters(model: Twins) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "OUTPUTS", "ModelSpec", "Twins", "TwinsConfig", "WeightsSource", "checkpoint_filter_fn",
           "count_parameters", "create_model", "model_table", "resolve_spec", "to_size"]


def model_table() -> list[dict]:
    """One row per published variant, for ``twins-deploy models`` (sizes counted on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for spec in MODELS.values():
        with torch.device("meta"):
            model = Twins(spec.config, spec.input_size, spec=spec)
            image = torch.empty(1, 3, *spec.input_size)
        with FlopCounterMode(display=False) as counter:
            model(image)
        rows.append({"name": spec.name, "aliases": list(spec.aliases), "params": count_parameters(model),
                     "gflops_224": round(counter.get_total_flops() / 1e9, 3),
                     "input_size": list(spec.input_size), "hub_id": spec.hub_id})
    return rows
