from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Self

SECTOR = 512


class BackendError(RuntimeError):
    """A backend that cannot be opened or changed as asked; the message says why."""


class Backend(ABC):
    """Storage behind one device. The data plane calls `native_ops()` from C, per request,
    without Python; the control path uses the methods here."""

    size: int
    readonly: bool

    @abstractmethod
    def native_ops(self) -> tuple[Any, Any]:
        """(const struct dp_backend_ops *, void *ctx) for the C data plane."""

    @property
    def async_unavailable(self) -> str | None:
        """Why requests cannot run on the asynchronous path, or None when they can."""
        return "this backend has no asynchronous path"

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def grow(self, size: int) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def discard_created(self) -> None:  # noqa: B027 (optional)
        """Removes what opening it created (used when a start-up fails)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
