"""What runs in the child on a Dask worker: unpack the call and make it.

Kept apart from the worker's module, which imports ``distributed``: a spawn or
forkserver child unpickles this class by importing its module, and should not
pay for importing Dask (a quarter of a second here).
"""

from __future__ import annotations

from typing import Any

import cloudpickle


class PickledCall:
    """``func(*args)``, pickled by the client with cloudpickle, called in the child.

    The client pickles with cloudpickle, as Dask does, so that functions
    defined in a script or a notebook reach the child; the worker passes the
    bytes on unread and never imports the caller's modules.  ``__qualname__``
    is the function's, so that aioproc's messages name it.
    """

    def __init__(self, qualname: str, blob: bytes) -> None:
        self.__qualname__ = qualname
        self.blob = blob

    def __call__(self) -> Any:
        func, args = cloudpickle.loads(self.blob)
        return func(*args)
