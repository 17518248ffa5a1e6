"""One registry of model families and their named variants, in timm's manner.

A *family* is one architecture from one library (timm's Twins, vit-pytorch's TwinsSVT, vit-flax's
ViT, ...): its model class, the dataclass of its constructor arguments, and the function that reads
its checkpoint files into the model's keys (the family's ``checkpoint_filter_fn`` lives beside the
model). A *spec* is a named variant of a family: a configuration plus the preprocessing it expects.
``--model`` resolves a spec by name or alias (case-insensitive); ``--config`` replaces its
configuration with a user's constructor arguments. Nothing downstream branches on the family: every
model class takes ``(config, img_size, output=..., spec=...)`` and offers ``img_size``,
``num_classes``, ``output``, ``set_fused_attn`` and ``init_weights``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from twins_deploy.errors import UsageError
from twins_deploy.models.dimensions import check_dimensions, config_values

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUTS = ("logits", "embedding", "features")  # what any family may offer; each lists its own


@dataclass(frozen=True)
class Family:
    """One architecture from one library, and how its files become our model's weights."""

    name: str  # e.g. "twins", "vit-pytorch/TwinsSVT"
    library: str  # where the architecture comes from: "timm", "vit-pytorch", "vit-flax"
    model_class: type  # built as model_class(config, img_size, output=..., spec=...)
    config_class: type  # frozen dataclass of the library's constructor arguments, with its defaults
    read_checkpoint: Callable[[Path], dict[str, "torch.Tensor"]]  # a weights file -> state_dict in our keys
    weights_format: str  # in words, for help and errors
    outputs: tuple[str, ...] = ("logits", "embedding")
    # (model, state_dict, origin) -> a one-line error naming what the file implies, or None
    explain_mismatch: Callable[[Any, dict, str], str | None] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A named variant: its family, configuration, names and the preprocessing it expects."""

    name: str
    config: Any  # the family's config dataclass
    aliases: tuple[str, ...] = ()
    hub_id: str | None = None
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    family: str = "twins"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


FAMILIES: dict[str, Family] = {}
MODELS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, ModelSpec] = {}


def register(family: Family, *specs: ModelSpec) -> None:
    """Add a family and its named variants (called once by each family module at import)."""
    FAMILIES[family.name] = family
    for spec in specs:
        if spec.family != family.name:
            raise ValueError(f"spec {spec.name} belongs to {spec.family}, not {family.name}")
        MODELS[spec.name] = spec
        for alias in spec.names:
            _ALIASES[alias.lower()] = spec


def family_of(spec: ModelSpec) -> Family:
    return FAMILIES[spec.family]


def to_size(img_size: int | tuple[int, int] | str, stride: int = 1) -> tuple[int, int]:
    """Parse 224, (224, 320) or '224x320' and check that both sides are multiples of ``stride``."""
    given = img_size
    if isinstance(img_size, str):
        parts = img_size.lower().split("x")
        if not all(p.strip().isdigit() for p in parts) or len(parts) > 2:
            raise ValueError(f"image size must look like 224 or 224x320, got {img_size!r}")
        img_size = tuple(int(p) for p in parts)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2 or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 or s % stride for s in size):
        raise ValueError(f"image height and width must be positive multiples of {stride}, got {given!r}")
    return int(size[0]), int(size[1])


def read_config(path: str | Path) -> dict:
    """Constructor arguments from a JSON (or YAML) file, at the top level or under ``"config"``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot parse config {path}: {first_line}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must hold a mapping of constructor arguments, got {type(data).__name__}")
    return data


def make_config(family: Family, kwargs: dict, origin: str = "config") -> tuple[Any, list[str]]:
    """The family's config from a user's constructor arguments; unknown keys are errors that name
    the key, and a non-zero dropout is accepted with a note (inference runs without dropout)."""
    fields = {f.name for f in dataclasses.fields(family.config_class)}
    for key in kwargs:
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{origin}: unknown key {key!r} for {family.name}{hint}; "
                             f"it takes {', '.join(sorted(fields))}")
    values = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in kwargs.items()}
    check_dimensions(family.config_class, values, origin)
    notes = [f"{key}={value} is ignored: inference runs without dropout"
             for key, value in values.items() if "dropout" in key and value]
    try:
        return family.config_class(**values), notes
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{origin}: {exc}") from None


def resolve_spec(name: str | ModelSpec | Any, config: str | Path | dict | Any | None = None,
                 notes: list[str] | None = None) -> ModelSpec:
    """A registered variant by any of its names (or a family's config object, as a "custom" variant);
    ``config`` (a file, a dict of constructor arguments or a config object) replaces its
    configuration. Notes on ignored keys go to ``notes``."""
    if isinstance(name, ModelSpec):
        spec = name
    elif not isinstance(name, str):
        family = next((f for f in FAMILIES.values() if isinstance(name, f.config_class)), None)
        if family is None:
            raise UsageError(f"{type(name).__name__} is no model name, spec or family config")
        check_dimensions(type(name), config_values(name))
        spec = ModelSpec("custom", name, family=family.name)
    else:
        spec = _ALIASES.get(str(name).lower().strip())
        if spec is None:
            import difflib

            close = difflib.get_close_matches(str(name).lower(), list(_ALIASES), n=1)
            hint = f" (did you mean {_ALIASES[close[0]].name}?)" if close else ""
            raise UsageError(f"unknown model {name!r}{hint}: choose one of {', '.join(MODELS)}")
    if config is None:
        return spec
    family = family_of(spec)
    if isinstance(config, family.config_class):
        check_dimensions(type(config), config_values(config))
        return _with_config(spec, config)
    origin = "config"
    if isinstance(config, (str, Path)):
        origin = f"config {config}"
        config = read_config(config)
    made, found = make_config(family, dict(config), origin)
    if notes is not None:
        notes.extend(found)
    return _with_config(spec, made)


def _with_config(spec: ModelSpec, config: Any) -> ModelSpec:
    """``spec`` with ``config``; a class that takes ``image_size`` (ViT, CaiT, CrossViT) sets the input size."""
    size = getattr(config, "image_size", None)
    return replace(spec, config=config, input_size=to_size(size) if size else spec.input_size)


def with_classes(spec: ModelSpec, num_classes: int | None) -> ModelSpec:
    if num_classes is None or num_classes == spec.config.num_classes:
        return spec
    check_dimensions(type(spec.config), {"num_classes": num_classes})
    return replace(spec, config=replace(spec.config, num_classes=num_classes))


def config_dict(config: Any) -> dict:
    """A config as JSON-ready constructor arguments (what ``--config`` reads back)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
