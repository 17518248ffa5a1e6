"""Every size a user types is checked before it reaches a model constructor.

A family's config dataclass says what each argument is through its annotations: an ``int`` (or a
tuple of them) is a size and must be a positive integer no larger than ``MAX_SIZE``; a ``float``
is a ratio (positive) or, for a ``*dropout*`` key, a rate in [0, 1). Zero is a size only where the
family gives it a meaning: its config lists it in ``ZERO_MEANING`` (Twins: ``num_classes`` 0 builds
no head). A wrong value is one ``UsageError`` naming the key and the value, raised before the
dataclass (whose checks divide by these sizes) or torch sees it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Mapping

from twins_deploy.errors import UsageError

MAX_SIZE = 2**31 - 1  # the largest dimension ONNX engines index with 32 bits; beyond it torch overflows too


def check_dimensions(config_class: type, values: Mapping[str, Any], origin: str | None = None) -> None:
    """Refuse a constructor argument in ``values`` that is not a valid size or ratio for ``config_class``."""
    kinds = _field_kinds(config_class)
    zero_meaning = getattr(config_class, "ZERO_MEANING", {})
    for key, value in values.items():
        if key not in kinds:
            continue  # unknown keys are make_config's to name
        leaves, nested = kinds[key]
        problem = _problem(key, value, leaves, nested, zero_meaning.get(key))
        if problem:
            raise UsageError(f"{origin}: {problem}" if origin else problem)


def config_values(config: Any) -> dict[str, Any]:
    """A config object's constructor arguments (not copied, unlike ``dataclasses.asdict``)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@functools.lru_cache(maxsize=None)
def _field_kinds(config_class: type) -> dict[str, tuple[frozenset, bool]]:
    """For each field: the leaf types its annotation allows, and whether it allows a tuple of them."""
    hints = typing.get_type_hints(config_class)
    return {f.name: (frozenset(_leaves(hints[f.name])), _allows_tuple(hints[f.name]))
            for f in dataclasses.fields(config_class)}


def _leaves(hint) -> set:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) or origin is tuple:
        return set().union(*(_leaves(arg) for arg in typing.get_args(hint) if arg is not Ellipsis))
    if hint is tuple:  # a bare tuple says nothing of its items
        return {Any}
    return {hint}


def _allows_tuple(hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_allows_tuple(arg) for arg in typing.get_args(hint))
    return origin is tuple or hint is tuple


def _flatten(value) -> list:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _problem(key: str, value, leaves: frozenset, nested: bool, zero_meaning: str | None) -> str | None:
    """What is wrong with ``value`` for a field with these leaf types, in words; None when it is fine."""
    if Any in leaves or str in leaves:
        return None  # the family's own checks cover strings (pool) and untyped items
    if value is None:
        return None if type(None) in leaves else f"{key} must be set, got None"
    numbers = _flatten(value)
    if isinstance(value, (tuple, list)) and not nested:
        return f"{key} takes one value, got {value!r}"
    if float in leaves:
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in numbers):
            return f"{key} must be a number, got {value!r}"
        if "dropout" in key:
            return None if all(0 <= x < 1 for x in numbers) else f"{key} must be a rate in [0, 1), got {value!r}"
        if all(x > 0 for x in numbers):
            return None
        return f"{key} must be {'positive numbers' if isinstance(value, (tuple, list)) else 'positive'}, got {value!r}"
    if int not in leaves:
        return None
    lowest = 0 if zero_meaning else 1
    if all(isinstance(x, int) and not isinstance(x, bool) and lowest <= x <= MAX_SIZE for x in numbers):
        return None
    what = "a positive integer" if not isinstance(value, (tuple, list)) else "positive integers"
    zero = f" or 0 ({zero_meaning})" if zero_meaning else ""
    too_big = any(isinstance(x, int) and x > MAX_SIZE for x in numbers)
    limit = f" up to {MAX_SIZE}" if too_big else ""
    return f"{key} must be {what}{limit}{zero}, got {value!r}"
