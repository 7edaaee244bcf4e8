"""Old names that keep working for one version, each with a ``FutureWarning`` naming the new one
(as transformers' ``deprecate_kwarg`` does for arguments and torch and timm do for moved names)."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_kwargs(**renames: str) -> Callable[[F], F]:
    """``@renamed_kwargs(kind="output")``: a call with ``kind=`` runs as ``output=`` and warns."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{fn.__name__}() got both {old}= and {new}=; pass {new}= only")
                warnings.warn(f"{fn.__name__}({old}=...) is deprecated and goes in the next version; use {new}=...",
                              FutureWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def renamed_attributes(module: str, renames: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` (PEP 562) that serves each old name in ``renames`` as the object its
    new name has in ``namespace``, with a warning."""

    def getattr_(name: str) -> Any:
        if name in renames:
            warnings.warn(f"{module}.{name} is deprecated and goes in the next version; use {renames[name]}",
                          FutureWarning, stacklevel=2)
            return namespace[renames[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return getattr_
