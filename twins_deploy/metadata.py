"""What an exported model carries about itself in ONNX ``metadata_props``.

Engines, the runtime and Triton read preprocessing and class names from here, so a user never
passes them by hand. Torch-free on purpose: the runtime imports it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources

from twins_deploy.errors import TwinsDeployError

FORMAT_KEY = "twins_deploy_version"  # present in every file we export


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's 1000 class names, in class-index order."""
    text = resources.files("twins_deploy.data").joinpath("imagenet1k_classes.txt").read_text()
    return text.splitlines()


@dataclass(frozen=True)
class ModelMetadata:
    model: str  # registry name, e.g. "svt-s", or "custom"
    input_size: tuple[int, int]  # (height, width) the graph was built for
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic"
    crop_pct: float
    output: str  # "logits", "embedding" or "features"
    class_names: tuple[str, ...] = ()
    weights: str = ""  # where the weights came from: "pretrained:timm/...", "random:seed=0" or a path
    weights_sha256: str = ""
    twins_deploy_version: str = ""
    torch_version: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # anything else, e.g. a quantization report

    def to_props(self) -> dict[str, str]:
        """Flat string key/values for ``onnx.ModelProto.metadata_props``."""
        props = {k: v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items() if k != "extra"}
        props.update(self.extra)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "the model") -> ModelMetadata:
        if FORMAT_KEY not in props:
            raise TwinsDeployError(
                f"{source} has no twins-deploy metadata: export it with 'twins-deploy export' "
                "(preprocessing and class names are read from it)")
        known = set(cls.__dataclass_fields__) - {"extra"}
        values = {}
        for key in known & set(props):
            raw = props[key]
            kind = cls.__dataclass_fields__[key].type
            values[key] = raw if kind == "str" else json.loads(raw)
        for key in ("input_size", "mean", "std", "class_names"):
            if key in values:
                values[key] = tuple(values[key])
        try:
            return cls(**values, extra={k: v for k, v in props.items() if k not in known})
        except TypeError as exc:
            raise TwinsDeployError(f"{source} has incomplete twins-deploy metadata: {exc}") from None
