"""Common building blocks for configuration models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, SecretStr, model_validator

from chargegate.strict_numbers import StrictNumbers, StrictNumbersInUnion

Ident = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]


Loc = tuple[str | int, ...]


class LocatedErrors(ValueError):
    """Raised by a model validator that finds several problems, each at its own path (relative to the
    model): :func:`chargegate.config.validate_data` reports each with its full path instead of one
    message at the model's own path. An error may name a second place (``(path, message, also)``: "used
    twice (also at ...)"), given relative to the model too."""

    def __init__(self, errors: list[tuple[Loc, str]] | list[tuple[Loc, str, Loc]]) -> None:
        self.items: list[tuple[Any, ...]] = list(errors)
        self.errors = self.located(())
        super().__init__("; ".join(msg for _, msg in self.errors))

    def located(self, base: Loc) -> list[tuple[Loc, str]]:
        """The errors with full paths, for a model found at ``base`` in the document."""
        from chargegate.topics import format_loc

        return [((*base, *e[0]), e[1] if len(e) == 2 else f"{e[1]} (also at {format_loc((*base, *e[2]))})")
                for e in self.items]


def twice(items: list[tuple[Loc, str]], what: str) -> list[tuple[Loc, str, Loc]]:
    """``(path, message, first path)`` for each value of ``(path, value)`` that an earlier item has already
    (for :class:`LocatedErrors`: ``rule id 'night' is used twice (also at controller.rules[0].id)``)."""
    first: dict[str, Loc] = {}
    errs = []
    for loc, value in items:
        if value in first:
            errs.append((loc, f"{what} {value!r} is used twice", first[value]))
        else:
            first[value] = loc
    return errs


class Strict(StrictNumbers):
    """Base for configuration sections: unknown keys are errors (typos must not pass); numbers are
    numbers (no ``true`` or ``"35"`` for a current) and finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StrictMember(StrictNumbersInUnion):
    """:class:`Strict` for a member of a discriminated union (e.g. a charging rule with ``type``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Secret(Strict):
    """A secret given inline, from an environment variable, or from a file (Docker secrets).

    In YAML: ``password: {env: CG_BACKEND_PASSWORD}`` or ``{file: /run/secrets/x}`` or
    ``{value: "..."}``; a plain string is taken as ``value``. Never logged or printed.
    """

    value: SecretStr | None = None
    env: str | None = None
    file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, data: object) -> object:
        if isinstance(data, str):
            return {"value": data}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> Secret:
        given = [x for x in (self.value, self.env, self.file) if x is not None]
        if len(given) != 1:
            raise ValueError("a secret needs exactly one of value, env or file")
        return self

    def reveal(self) -> str:
        if self.value is not None:
            return self.value.get_secret_value()
        if self.env is not None:
            try:
                return os.environ[self.env]
            except KeyError:
                raise LookupError(f"secret environment variable {self.env} is not set") from None
        assert self.file is not None
        try:
            return self.file.read_text().strip()
        except OSError as e:
            raise LookupError(f"secret file {self.file} cannot be read: {e.strerror}") from None

    def __repr__(self) -> str:
        src = "value" if self.value is not None else (f"env:{self.env}" if self.env else f"file:{self.file}")
        return f"Secret({src}, '**********')"

    __str__ = __repr__
