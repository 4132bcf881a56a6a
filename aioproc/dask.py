"""``aioproc.dask``: the calls of ``aioproc.Pool`` on a Dask cluster.

Install with ``pip install aioproc[dask]``.

``DaskPool`` has the interface of ``aioproc.Pool``: code written against
``pool.run`` and ``pool.map`` moves to a cluster by constructing the other
pool.  Importing this module imports ``distributed``; ``import aioproc`` never
does.
"""

from __future__ import annotations

from ._dask._errors import DaemonicWorkers, WorkerLost
from ._dask._pool import DaskPool

__all__ = ["DaemonicWorkers", "DaskPool", "WorkerLost"]
