"""Does an engine compute what the PyTorch fp32 model computes? Parity figures with per-precision limits."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from twins_deploy.engines.base import Runner
from twins_deploy.errors import UsageError
from twins_deploy.memory import check_batch
from twins_deploy.metadata import ModelMetadata
from twins_deploy.parity import Parity, compare


@dataclass(frozen=True)
class Threshold:
    cosine: float  # lowest per-sample cosine to the fp32 reference
    max_rel: float | None  # largest |diff| / max |reference|
    top1: float  # top-1 agreement; only enforced for trained weights (random logits are near ties)


THRESHOLDS = {
    "fp32": Threshold(cosine=0.99999, max_rel=1e-3, top1=1.0),
    "fp16": Threshold(cosine=0.999, max_rel=2e-2, top1=0.95),
    "bf16": Threshold(cosine=0.99, max_rel=1e-1, top1=0.9),
    "int8": Threshold(cosine=0.99, max_rel=None, top1=0.9),
    "best": Threshold(cosine=0.99, max_rel=None, top1=0.9),
}


@dataclass(frozen=True)
class VerifyReport:
    engine: str
    backend: str
    precision: str
    device: str
    inputs: str  # "synthetic, seed 1" or the image folder
    samples: int
    parity: Parity
    threshold: Threshold
    checks: dict  # name -> passed
    passed: bool

    def as_dict(self) -> dict:
        report = asdict(self)
        report["parity"] = self.parity.as_dict()
        report["schema_version"] = 1
        return report


def reference_weights(meta: ModelMetadata) -> str:
    """The ``weights`` argument that rebuilds the model an export was made from, read from its metadata."""
    kind = meta.weights.split(":", 1)[0]
    if kind in ("pretrained", "random"):
        return kind
    if meta.weights and Path(meta.weights).is_file():
        return meta.weights
    raise UsageError(f"the engine was exported from weights {meta.weights or '(unknown)'}, not found here: "
                     "pass --weights PATH")


def reference_model(meta: ModelMetadata) -> tuple[object, dict | None]:
    """The model an export was made from, as its metadata says: (a name or a config object, the
    constructor arguments to build it with)."""
    import json

    raw = meta.extra.get("model_config")
    arguments = json.loads(raw) if raw else None
    if meta.model != "custom":
        return meta.model, arguments
    if arguments is None:
        raise UsageError("the engine holds a custom configuration and does not record it: pass --model "
                         "(and --config) for the reference")
    from twins_deploy.models import FAMILIES
    from twins_deploy.models.registry import make_config

    return make_config(FAMILIES[meta.extra.get("model_family", "twins")], arguments)[0], None


def verification_inputs(meta: ModelMetadata, images: str | Path | None, samples: int,
                        seed: int = 1) -> tuple[np.ndarray, str]:
    """Preprocessed images from a folder, or seeded synthetic ones; and a description for the report."""
    from twins_deploy.engines.quantize import folder_images, synthetic_images

    if images is not None:
        arrays, _ = folder_images(images, meta, samples)
        return arrays, str(images)
    return synthetic_images(meta, samples, seed=seed), f"synthetic, seed {seed}"


def _outputs(arrays: dict[str, np.ndarray], names) -> np.ndarray:
    return np.concatenate([arrays[name].reshape(len(arrays[name]), -1) for name in names], axis=1)


def verify(runner: Runner, reference: Runner, inputs: np.ndarray, *, source: str, trained: bool,
           batch_size: int = 8) -> VerifyReport:
    """Compare active ``runner`` with active ``reference`` (torch fp32) on ``inputs``, batch by batch."""
    info, ref_info = runner.describe(), reference.describe()
    if info.input_shape[1:] != ref_info.input_shape[1:]:
        raise UsageError(f"the engine takes {info.input_shape[1:]} but the reference model {ref_info.input_shape[1:]}: "
                         "pass the --img-size the engine was built for")
    batch_size = max(1, min(batch_size, info.max_batch or batch_size, len(inputs)))
    check_batch("verify", [info.metadata] * 2, batch_size)  # the engine and the reference run one model
    got, want = [], []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        got.append(_outputs(runner.infer(chunk), info.output_names))
        want.append(_outputs(reference.infer(chunk), ref_info.output_names))
    candidate, expected = np.concatenate(got), np.concatenate(want)
    if candidate.shape != expected.shape:
        raise UsageError(f"the engine outputs {candidate.shape[1]} values per image, the reference "
                         f"{expected.shape[1]}: pass the --model/--num-classes the engine was exported from")
    classify = info.metadata.output == "logits"
    parity = compare(expected, candidate, classify=classify)
    threshold = THRESHOLDS[info.precision]
    checks = {"cosine": parity.cosine >= threshold.cosine}
    if threshold.max_rel is not None:
        checks["max_rel"] = parity.max_rel <= threshold.max_rel
    if classify and trained:
        checks["top1_agreement"] = parity.top1_agreement >= threshold.top1
    return VerifyReport(info.name, info.backend, info.precision, info.device, source, len(inputs), parity, threshold,
                        checks, all(checks.values()))
