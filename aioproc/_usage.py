"""What the kernel accounted to a child by the time it was reaped."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import resource

# ru_maxrss is in kibibytes on Linux and the BSDs, in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


class ResourceUsage(NamedTuple):
    """CPU time and peak memory of a child, from the kernel's accounting at its reaping.

    Read with ``wait4()`` in the same call that collects the exit status, so it
    covers the child's whole life, plus that of the children it waited for
    itself (the kernel adds those in).

    - ``user_time``, ``system_time``: CPU seconds in user mode and in the kernel.
    - ``max_rss``: peak resident set size in bytes.  A forked child starts with
      its parent's resident pages mapped (shared, copy-on-write), and they count
      from the first instant: its peak is at least the parent's size at the
      fork, however little the child itself touched.  A spawn child's peak is
      its own interpreter's.

    A named tuple (not a dataclass, whose import costs every spawn and
    forkserver child 5 ms).
    """

    user_time: float
    system_time: float
    max_rss: int

    @classmethod
    def from_rusage(cls, usage: resource.struct_rusage) -> ResourceUsage:
        return cls(
            user_time=usage.ru_utime,
            system_time=usage.ru_stime,
            max_rss=usage.ru_maxrss * _MAXRSS_UNIT,
        )
