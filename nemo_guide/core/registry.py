"""A small registry keyed by a ``str`` Enum, for interchangeable pieces.

Guidance thresholds, loss aggregations, ratio shapings and KL estimators each keep
one. Registering a name twice raises; looking up an unknown name lists the valid ones.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps the members of ``enum`` to functions.

    Args:
        what: a human name for error messages, e.g. ``"loss aggregation"``.
        enum: the ``str`` Enum whose members are the valid keys.
    """

    def __init__(self, what: str, enum: type[Enum]) -> None:
        self.what = what
        self.enum = enum
        self._fns: dict[Enum, F] = {}

    def register(self, name: str | Enum) -> Callable[[F], F]:
        key = self.key(name)

        def decorator(fn: F) -> F:
            if key in self._fns:
                raise ValueError(f"{self.what} {key.value!r} is registered twice ({self._fns[key].__qualname__} and {fn.__qualname__})")
            self._fns[key] = fn
            return fn

        return decorator

    def key(self, name: str | Enum) -> Enum:
        """The enum member for ``name``; raises ``ValueError`` listing the valid names."""
        if isinstance(name, self.enum):
            return name
        try:
            return self.enum(name)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in self.enum)
            raise ValueError(f"unknown {self.what} {name!r}; valid: {valid}") from None

    def __getitem__(self, name: str | Enum) -> F:
        key = self.key(name)
        if key not in self._fns:
            raise ValueError(f"{self.what} {key.value!r} has no implementation registered (registered: {', '.join(self.names()) or 'none'})")
        return self._fns[key]

    def names(self) -> list[str]:
        """The names that have an implementation, in registration order."""
        return [k.value for k in self._fns]
