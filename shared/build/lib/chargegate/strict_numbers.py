"""Strict numbers for models validated from outside input (configuration files, HTTP request bodies).

pydantic's lax mode takes ``true`` as 1, ``"35"`` as 35 and, without bounds, ``NaN`` and ``Infinity``
as floats: an ``{"value": true}`` would set AVAIL to 1 %. :class:`StrictNumbers` refuses, for every
field whose type is a number (or a list/tuple/dict of numbers, optional or not), a boolean or a
string in its place, and non-finite floats, and for a boolean field anything but ``true``/``false``;
the error names the field like any validation error.
Fields that also accept booleans or strings (``int | str``) are left as they are.
"""

from __future__ import annotations

import math
import types
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AliasChoices, BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

_NUMBER = (int, float)


def _numeric(annotation: Any) -> str | None:
    """``"bool"`` for a boolean, ``"scalar"`` for a number type, ``"items"`` for a list/tuple/set of
    numbers, ``"values"`` for a dict with number values, else None (not a number, or a type that also
    takes booleans or strings)."""
    try:
        return _numeric_cached(annotation)
    except TypeError:  # an annotation that cannot be hashed
        return _numeric_of(annotation)


@cache
def _numeric_cached(annotation: Any) -> str | None:
    return _numeric_of(annotation)


def _numeric_of(annotation: Any) -> str | None:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _numeric(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(annotation) if a is not type(None)]
        kinds = {_numeric(a) for a in arms}
        if any(a in (bool, str) or get_origin(a) is Literal for a in arms) or len(kinds) != 1:
            return None
        return kinds.pop()
    if origin in (list, tuple, set, frozenset):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        return "items" if args and all(_numeric(a) == "scalar" for a in args) else None
    if origin is dict:
        args = get_args(annotation)
        return "values" if len(args) == 2 and _numeric(args[1]) == "scalar" else None
    if annotation is bool:
        return "bool"
    if annotation in _NUMBER:
        return "scalar"
    return None


def _check(value: Any) -> None:
    if isinstance(value, bool):
        raise ValueError("a valid number is needed, not a boolean")
    if isinstance(value, str):
        raise ValueError(f"a valid number is needed, not a string ({value[:20]!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"a finite number is needed, not {value}")


def _keys(name: str, field: FieldInfo) -> list[str]:
    keys = [name]
    if field.alias:
        keys.append(field.alias)
    va = field.validation_alias
    if isinstance(va, str):
        keys.append(va)
    elif isinstance(va, AliasChoices):
        keys += [c for c in va.choices if isinstance(c, str)]
    return keys


def _check_kind(kind: str, value: Any) -> None:
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"true or false is needed, not {type(value).__name__} {str(value)[:20]!r}")
    elif kind == "scalar":
        _check(value)
    elif kind == "items" and isinstance(value, list | tuple | set | frozenset):
        for x in value:
            _check(x)
    elif kind == "values" and isinstance(value, dict):
        for x in value.values():
            _check(x)


class StrictNumbers(BaseModel):
    """Mixin: numbers are numbers (see the module docstring); floats are finite. The error's path
    ends at the field."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        kind = _numeric(field.annotation) if field is not None else None
        if kind is not None and value is not None:
            _check_kind(kind, value)
        return value


class StrictNumbersInUnion(BaseModel):
    """The same for a member of a discriminated union (pydantic allows no "before" validator on the
    discriminator field, so this one checks at model level: the error's path ends at the model and
    its message starts with the field's name)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            kind = _numeric(field.annotation)
            if kind is None:
                continue
            for key in _keys(name, field):
                value = data.get(key)
                if value is not None:
                    try:
                        _check_kind(kind, value)
                    except ValueError as e:
                        raise ValueError(f"{key}: {e}") from None
        return data
