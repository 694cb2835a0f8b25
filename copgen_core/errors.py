"""Exceptions that survive a trip between processes.

Dask and Prefect pickle a worker's exception to report it in the driver. Python re-creates an exception
by calling ``cls(*self.args)``, which fails for classes whose ``__init__`` takes other arguments than
the message (the driver then sees a confusing ``TypeError`` instead of the real error). Subclassing
:class:`PicklableError` restores the instance as it was: same message, same attributes.
"""

from __future__ import annotations

from typing import Any


def _restore(cls: type[BaseException], args: tuple, state: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls)
    BaseException.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class PicklableError(Exception):
    """Mixin: pickle by message and attributes, not by re-running ``__init__``."""

    def __reduce__(self):
        return _restore, (type(self), self.args, dict(self.__dict__))
