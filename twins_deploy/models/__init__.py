"""The model zoo: every family's named variants, ``create_model`` and the table ``models`` prints.

Each family lives in its own module (config, static forward, key conversion) and registers itself
in ``registry`` at import; ``FAMILY_MODULES`` lists them.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from twins_deploy.errors import UsageError
from twins_deploy.models.registry import (
    FAMILIES, MODELS, OUTPUTS, Family, ModelSpec, config_dict, family_of, resolve_spec, to_size, with_classes,
)
from twins_deploy.models.twins import Twins, TwinsConfig, checkpoint_filter_fn
from twins_deploy.models.weights import WeightsSource, load_weights

FAMILY_MODULES = ("twins", "vit_pytorch_twins_svt", "flax_twins_svt", "flax_vit", "flax_cait", "flax_crossformer", "flax_cross_vit")
for _module in FAMILY_MODULES:
    importlib.import_module(f"twins_deploy.models.{_module}")


def create_model(name: str | ModelSpec, *, weights: str | Path = "random",
                 img_size: int | tuple[int, int] | str | None = None, num_classes: int | None = None,
                 output: str = "logits", seed: int = 0, config: str | Path | dict | None = None):
    """Build a model for one input size and fill its weights; returns it in eval mode.

    ``name``: a registered name or alias (``svt-s``, ``vit-flax/TwinsSVT``) or a ``ModelSpec``.
    ``config``: the family's constructor arguments (a dict, a JSON/YAML file or a config object).
    ``weights``: 'pretrained' (hub), 'random' (seeded) or a checkpoint path in the family's format.
    ``model.weights_source`` records where the weights came from (with the file's sha256).
    """
    spec = with_classes(resolve_spec(name, config), num_classes)
    family = family_of(spec)
    if output not in family.outputs:
        raise UsageError(f"{spec.name} offers the outputs {', '.join(family.outputs)}, not {output!r}")
    from twins_deploy.memory import check_model_build

    check_model_build(spec, img_size or spec.input_size)  # refused before a byte is allocated if it cannot fit
    try:
        model = family.model_class(spec.config, img_size or spec.input_size, output=output, spec=spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model.weights_source = load_weights(model, weights, seed)
    return model.eval()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def model_table() -> list[dict]:
    """One row per registered variant, for ``twins-deploy models`` (sizes counted on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for spec in MODELS.values():
        family = family_of(spec)
        with torch.device("meta"):
            model = family.model_class(spec.config, spec.input_size, spec=spec)
            image = torch.empty(1, 3, *spec.input_size)
        with FlopCounterMode(display=False) as counter:
            model(image)
        rows.append({"name": spec.name, "aliases": list(spec.aliases), "family": family.name,
                     "library": family.library, "params": count_parameters(model),
                     "gflops": round(counter.get_total_flops() / 1e9, 3), "input_size": list(spec.input_size),
                     "hub_id": spec.hub_id, "weights": spec.hub_id or family.weights_format,
                     "configurable": family.name != "twins"})
    return rows


__all__ = ["FAMILIES", "MODELS", "OUTPUTS", "Family", "ModelSpec", "Twins", "TwinsConfig", "WeightsSource",
           "checkpoint_filter_fn", "config_dict", "count_parameters", "create_model", "family_of", "model_table",
           "resolve_spec", "to_size", "with_classes"]
