"""How much memory a step will need, from the model's configuration alone, and the guard that
refuses a step this process cannot hold before anything is allocated.

The model is built on PyTorch's meta device (shapes, no storage) and one forward of one image is
replayed under a dispatch mode that records when every intermediate tensor is made and last read,
as a memory planner does. The largest sum of live tensors is the activation peak of one image; the
sum of all of them is what onnxruntime's int8 calibration holds (measured: its session keeps a
batch's intermediate tensors alive). The replay uses the exported attention (explicit scores),
which is what onnxruntime runs. Each step adds the copies of the
weights it makes; the constants below are peak RSS (VmHWM) measured on this project's exports and
builds (tests/test_sizes.py checks two exports against their measured peak).

The guard compares the estimate with what this process can still use: the machine's available
memory, the room under a cgroup (v2 or v1) memory limit and under ``ulimit -v``, whichever is
smallest. ``TWINS_DEPLOY_MEMORY_GUARD=off`` skips the check.
"""
from __future__ import annotations

import functools
import itertools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from twins_deploy.errors import UsageError

if TYPE_CHECKING:
    from twins_deploy.metadata import ModelMetadata
    from twins_deploy.models import ModelSpec

MB = 10**6
EXPORT_BASELINE = 500 * MB  # peak RSS of exporting the 0.8 MB tiny-svt: torch.export, onnx, onnxscript, onnxruntime
EXPORT_WEIGHT_COPIES = 9  # peak while simplifying and checking (torch's, the proto's, the optimizer's, shape
#                           inference's, serialised bytes): 9.2x on svt-s, 8.0x on vit-flax/ViT, above the tiny one
MODEL_WEIGHT_COPIES = 2  # a model being built holds its weights and, while loading, the checkpoint's tensors
CALIBRATION_WEIGHT_COPIES = 3  # quantize_int8: the loaded model, its augmented copy and the calibration session
ONNXRUNTIME_FACTOR = 2  # onnxruntime's graph and arena over the replayed torch forward: measured 0.8x (ViT) to 2.9x
#                        (svt-s) at a batch's peak, 2.0x on svt-s's int8 calibration
MAX_MODULES = 5_000  # 8x the largest registered model (CrossFormer: 603); more would take the meta build minutes
GUARD_ENV = "TWINS_DEPLOY_MEMORY_GUARD"
METADATA_KEY = "memory_footprint"  # an export records its footprint, so engines run on it need no replay
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


@dataclass(frozen=True)
class Footprint:
    """What one model needs in float32: its weights and, per image, the input, the activation peak and all
    intermediate tensors."""

    label: str  # "svt-s at 224x224"
    img_size: tuple[int, int]
    weight_bytes: int
    input_bytes: int
    activation_bytes: int
    intermediate_bytes: int

    def to_metadata(self) -> dict[str, str]:
        """The ``metadata_props`` entry an export carries."""
        import json

        keys = ("weight_bytes", "input_bytes", "activation_bytes", "intermediate_bytes")
        return {METADATA_KEY: json.dumps({key: getattr(self, key) for key in keys})}


@dataclass(frozen=True)
class Estimate:
    """The memory a step will add to this process, part by part ("weights": bytes), and what to change if it
    does not fit."""

    step: str  # "export of svt-s at 224x224"
    parts: dict[str, int]
    hint: str

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def refusal(self, available: int, where: str) -> str:
        parts = ", ".join(f"{_human(size)} of {name}" for name, size in self.parts.items() if size)
        return (f"{self.step} needs about {_human(self.total)} of memory ({parts}) but {_human(available)} is "
                f"available ({where}): {self.hint}")


# ----------------------------------------------------------------------------------------------
# The footprint of a model, on the meta device


def footprint(spec: ModelSpec, img_size, output: str = "logits") -> Footprint:
    """Weights and per-image activation memory of ``spec`` at ``img_size``, without allocating either."""
    return _footprint(spec, _hashable(img_size), output)


@functools.lru_cache(maxsize=64)
def _footprint(spec: ModelSpec, img_size, output: str) -> Footprint:
    import torch
    from torch.utils._pytree import tree_flatten

    model = _meta_model(spec, img_size, output)
    model.set_fused_attn(False)  # the exported attention: what onnxruntime runs
    height, width = model.img_size
    label = f"{spec.name} at {height}x{width}"
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    replay = _liveness_mode()([*model.parameters(), *model.buffers()])
    try:
        with torch.no_grad(), replay:
            pixels = torch.empty(1, 3, height, width, device="meta")
            outputs = model(pixels)
    except (RuntimeError, TypeError, OverflowError) as exc:  # shapes that do not fit, sizes beyond 64 bits
        raise UsageError(_unbuildable(label, exc)) from None
    replay.read(tree_flatten(outputs)[0], until_end=True)
    return Footprint(label, (height, width), weights, 3 * height * width * 4, replay.peak(), sum(replay.sizes))


def weight_bytes(spec: ModelSpec, img_size) -> int:
    """Bytes of the weights (parameters and buffers) ``spec`` builds at ``img_size``, counted on the meta device."""
    return _weight_bytes(spec, _hashable(img_size))


@functools.lru_cache(maxsize=64)
def _weight_bytes(spec: ModelSpec, img_size) -> int:
    model = _meta_model(spec, img_size, "logits")
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


class _TooManyModules(Exception):
    pass


def _meta_model(spec: ModelSpec, img_size, output: str):
    """The model on the meta device; a configuration it cannot be built from is a one-line UsageError."""
    import torch
    from torch.nn.modules.module import register_module_module_registration_hook

    from twins_deploy.models import family_of

    builder, count = threading.get_ident(), itertools.count(1)

    def count_module(module, name, submodule):
        if threading.get_ident() == builder and next(count) > MAX_MODULES:
            raise _TooManyModules

    handle = register_module_module_registration_hook(count_module)
    try:
        with torch.device("meta"):
            return family_of(spec).model_class(spec.config, img_size, output=output, spec=spec)
    except _TooManyModules:
        raise UsageError(f"{spec.name} with this configuration builds more than {MAX_MODULES:,} modules: "
                         "use a smaller depth") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except (RuntimeError, TypeError, OverflowError) as exc:
        raise UsageError(_unbuildable(f"{spec.name} at {img_size}", exc)) from None
    finally:
        handle.remove()


def _unbuildable(label: str, exc: Exception) -> str:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "overflow" in first_line.lower():
        return f"{label} is too large: its tensors would exceed 2^63 bytes; use a smaller --img-size or configuration"
    return f"{label} cannot be built with this configuration: {first_line}"


def _hashable(img_size):
    return tuple(img_size) if isinstance(img_size, list) else img_size


@functools.cache
def _liveness_mode() -> type:
    """The dispatch mode class (made on first use: torch is imported only by steps that build models)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Liveness(TorchDispatchMode):
        """Records, for every storage an op creates, its bytes, the op that made it and the last op that read it.

        Storages are told apart by address; every tensor is held until the replay ends, so no address
        is reused. Views and in-place results share their input's storage and add nothing.
        """

        def __init__(self, external):
            super().__init__()
            self.external = {t.untyped_storage()._cdata for t in external}  # the weights: counted apart
            self.index: dict[int, int] = {}
            self.sizes: list[int] = []
            self.born: list[int] = []
            self.last: list[int] = []
            self.held: list = []
            self.step = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.step += 1
            self.read(tree_flatten((args, kwargs))[0])
            aliases = any(r.alias_info is not None for r in func._schema.returns)
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor):
                    continue
                key = tensor.untyped_storage()._cdata
                if key in self.index:
                    self.read([tensor])
                elif not aliases and key not in self.external:
                    self.index[key] = len(self.sizes)
                    self.sizes.append(tensor.untyped_storage().nbytes())
                    self.born.append(self.step)
                    self.last.append(self.step)
                    self.held.append(tensor)
            return out

        def read(self, values, until_end: bool = False) -> None:
            for tensor in values:
                position = self.index.get(tensor.untyped_storage()._cdata) if isinstance(tensor, torch.Tensor) else None
                if position is not None:
                    self.last[position] = self.step + 1 if until_end else self.step

        def peak(self) -> int:
            change = [0] * (self.step + 3)
            for size, born, last in zip(self.sizes, self.born, self.last):
                change[born] += size
                change[last + 1] -= size
            return max(itertools.accumulate(change), default=0)

    return Liveness


# ----------------------------------------------------------------------------------------------
# What each step needs, and the guard


def check_model_build(spec: ModelSpec, img_size) -> None:
    """Before ``create_model`` allocates: the weights, and a checkpoint's copy while it loads."""
    weights = weight_bytes(spec, img_size)
    check(Estimate(f"building {spec.name} at {_size_text(img_size)}", {"weights": MODEL_WEIGHT_COPIES * weights},
                   "use a smaller configuration (dims, depth, mlp sizes, classes)"))


def export_estimate(spec: ModelSpec, img_size, head: str, trace_batch: int, verify_batch: int) -> Estimate:
    """An export's growth: the libraries it loads, the copies of the weights while simplifying and checking, the
    traced input and the activations of verification at its largest batch (0: no verification)."""
    fp = footprint(spec, img_size, head)
    weights = EXPORT_WEIGHT_COPIES * fp.weight_bytes
    activations = verify_batch * fp.activation_bytes + trace_batch * fp.input_bytes
    hint = "use a smaller --img-size" if activations > weights else \
        "use a smaller configuration (dims, depth, mlp sizes, classes)"
    parts = {"libraries": max(0, EXPORT_BASELINE - _resident_bytes()), "weights": weights,
             f"activations at batch {max(trace_batch, verify_batch)}": activations}
    return Estimate(f"export of {fp.label}", parts, hint)


def check_export(spec: ModelSpec, img_size, head: str, trace_batch: int, verify_batch: int) -> None:
    check(export_estimate(spec, img_size, head, trace_batch, verify_batch))


def check_calibration(meta: ModelMetadata, images: int, batch: int) -> None:
    """Before onnxruntime's int8 calibration on ``images`` images, ``batch`` at a time: it keeps every intermediate
    tensor of a batch alive."""
    fp = _footprint_of(meta)
    if fp is None:
        return
    batch = min(batch, images)
    check(Estimate(f"int8 calibration of {fp.label}",
                   {"weights": CALIBRATION_WEIGHT_COPIES * fp.weight_bytes,
                    f"activations at batch {batch}": ONNXRUNTIME_FACTOR * batch * fp.intermediate_bytes},
                   f"calibrate on fewer images (--calib-images; {batch} run at a time) or export a smaller --img-size"))


def check_batch(step: str, metadata: Sequence[ModelMetadata], batch: int) -> None:
    """Before engines (already loaded) run ``batch`` images: each keeps its own activations."""
    prints = [fp for fp in map(_footprint_of, metadata) if fp is not None]
    if not prints:
        return
    activations = sum(ONNXRUNTIME_FACTOR * batch * fp.activation_bytes for fp in prints)
    check(Estimate(f"{step} of {prints[0].label}", {"input": batch * prints[0].input_bytes,
                                                    f"activations at batch {batch}": activations},
                   "use a smaller batch size" if batch > 1 else "use a smaller input size (--img-size)"))


def check_images(count: int, input_size: tuple[int, int]) -> None:
    """Before preprocessed images (verification samples, calibration sets) are stacked in memory."""
    height, width = input_size
    check(Estimate(f"preparing {count:,} images at {height}x{width}", {"images": count * 3 * height * width * 4},
                   "ask for fewer images (--samples, --calib-images)"))


def check(estimate: Estimate) -> None:
    """Refuse (UsageError, exit 2) a step whose estimate exceeds what this process can still use."""
    if os.environ.get(GUARD_ENV, "").strip().lower() == "off":
        return
    room = available_memory()
    if room is not None and estimate.total > room[0]:
        raise UsageError(estimate.refusal(*room))


def _footprint_of(meta: ModelMetadata) -> Footprint | None:
    """The footprint of the model an engine was made from: recorded in its metadata by the export, or replayed from
    the configuration it records; None when it cannot tell."""
    import json

    height, width = meta.input_size
    label = f"{meta.model} at {height}x{width}"
    try:
        return Footprint(label, (height, width), **json.loads(meta.extra[METADATA_KEY]))
    except (KeyError, ValueError, TypeError):  # an export without it (or with a damaged one): replay
        pass
    from twins_deploy.engines.verify import reference_model
    from twins_deploy.errors import TwinsDeployError
    from twins_deploy.models import resolve_spec

    try:
        model, arguments = reference_model(meta)
        spec = resolve_spec(model, arguments)
    except TwinsDeployError:  # a custom model without its configuration, or one this version does not know
        return None
    return footprint(spec, meta.input_size, meta.output)


# ----------------------------------------------------------------------------------------------
# What this process can use


def available_memory() -> tuple[int, str] | None:
    """Bytes this process can still add, and the limit that says so: the smallest of MemAvailable, the room
    under a cgroup memory limit and the address space left under ``ulimit -v``. None when none is known."""
    limits = []
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        limits.append((available, "MemAvailable"))
    room = cgroup_room()
    if room is not None:
        limits.append(room)
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            used = _proc_bytes("/proc/self/status", "VmSize") or 0
            limits.append((max(0, soft - used), f"address-space limit, ulimit -v {soft // 1024}"))
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


def cgroup_room(root: str | Path = "/sys/fs/cgroup",
                membership: str | Path = "/proc/self/cgroup") -> tuple[int, str] | None:
    """Room left under the tightest cgroup memory limit of this process (v2, or v1's memory controller): the limit
    less what the group uses, page cache it can drop not counted. None without a limit."""
    root = Path(root)
    try:
        lines = Path(membership).read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = base / group.strip("/")
        while True:  # the group and its parents; inside a container only the mounted root may exist
            room = _room(folder, *files)
            if room is not None:
                rooms.append(room)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    if not rooms:
        return None
    room, limit = min(rooms)
    return room, f"cgroup memory limit {_human(limit)}"


def _room(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> tuple[int, int] | None:
    try:
        text = (folder / limit_file).read_text().strip()
        if text == "max" or int(text) >= _UNLIMITED:
            return None
        limit, usage = int(text), int((folder / usage_file).read_text())
        stats = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
    except (OSError, ValueError):
        return None
    return max(0, limit - usage + int(stats.get(inactive_key, 0))), limit


def _proc_bytes(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a /proc file in bytes (None where there is no such file or line)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _resident_bytes() -> int:
    return _proc_bytes("/proc/self/status", "VmRSS") or 0


def _size_text(img_size) -> str:
    from twins_deploy.models import to_size

    return "x".join(map(str, to_size(img_size)))


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit in ("B", "kB") else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} EB" if value < 1000 else f"{value:.1e} EB"
