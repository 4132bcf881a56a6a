"""A tracer that holds a process in its PTRACE_EVENT_EXIT stop (see ``helpers.Tracer`` users).

Run as ``python tests/scripts/tracer.py PID``.  Once SIGKILL arrives, the
process is dying but not dead (not reaped, its pidfd not readable) for as
long as the tracer wants, which is what a process stuck in the kernel looks
like to its parent.  Stops before that (SIGTERM) are passed on.  It lets go
when its stdin closes.
"""

from __future__ import annotations

import ctypes
import os
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_CONT, PTRACE_DETACH, PTRACE_SEIZE = 7, 17, 0x4206
PTRACE_O_TRACEEXIT, PTRACE_EVENT_EXIT, WALL = 0x40, 6, 0x40000000
pid = int(sys.argv[1])
if libc.ptrace(PTRACE_SEIZE, pid, None, ctypes.c_void_p(PTRACE_O_TRACEEXIT)) != 0:
    print("error", os.strerror(ctypes.get_errno()), flush=True)
    sys.exit(1)
print("seized", flush=True)
while True:
    _, status = os.waitpid(pid, WALL)
    if not os.WIFSTOPPED(status):
        print("gone", flush=True)
        break
    if status >> 16 == PTRACE_EVENT_EXIT:
        print("holding", flush=True)
        sys.stdin.read()
        libc.ptrace(PTRACE_DETACH, pid, None, None)
        break
    libc.ptrace(PTRACE_CONT, pid, None, ctypes.c_void_p(os.WSTOPSIG(status)))
