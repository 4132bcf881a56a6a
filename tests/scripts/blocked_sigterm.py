"""A process that is none of aioproc's business and keeps any SIGTERM pending.

Run by ``tests/test_forkserver_pidfd.py``; says ``ready`` once SIGTERM is blocked.
"""

from __future__ import annotations

import signal
import time

signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])  # a SIGTERM stays pending
print("ready", flush=True)
time.sleep(60)
