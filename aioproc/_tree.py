"""Process trees and lifelines: a child that leads its own process group, a child
that dies with its parent.

Process groups.  A child started with ``new_process_group=True`` calls
``setpgid(0, 0)`` first thing in its bootstrap, before any code of the user's
runs, so every process it forks (and they fork) is in a group whose id is the
child's pid; for the fork method the parent makes the same call right after the
fork, so the group exists when ``start()`` returns.  A signal for the child then
goes to the whole group, sent by the child's handle (``_child``).  A group id
is only safe to signal while it cannot name a stranger's group, and the kernel
gives two ways to be sure:

- ``pidfd_send_signal(pidfd, sig, PIDFD_SIGNAL_PROCESS_GROUP)`` (Linux >= 6.9)
  signals the group of the very ``struct pid`` the pidfd holds: never a reused
  number, even once the leader is reaped, and whoever reaped it (a forkserver
  child is reaped by the fork server).  Used wherever the handle has a pidfd.
- ``killpg(pid)`` while the leader is our unreaped child: until we collect its
  status, its pid (a zombie's included) is in use, and Linux hands out no pid
  number still in use as a pid, a group or a session id.  Used for fork and
  spawn children otherwise.  A forkserver child without a pidfd has neither
  guarantee (the fork server reaps it behind our back), so it gets the signal
  alone.

Either way, ESRCH means no such group yet: a spawn or forkserver child that has
not reached its ``setpgid`` is alone in its tree, and gets the signal alone.

Lifelines.  ``die_with_parent=True`` sets ``prctl(PR_SET_PDEATHSIG, SIGKILL)``
first thing in the child's bootstrap.  The parent may have died already, before
the child got there; the child then has another parent, so it compares
``getppid()`` with the pid its parent recorded before the start and, if they
differ, kills itself with SIGKILL: the end it would have had, had the signal
been set a moment earlier.  Not for forkserver children: their parent is the
fork server, which lives on after our process dies for as long as any of its
children does (each child holds a copy of the pipe whose end-of-file tells the
server to exit), so its death would never come.
"""

from __future__ import annotations

import errno
import os
import signal

_PR_SET_PDEATHSIG = 1
#: pidfd_send_signal() flag (Linux >= 6.9): the group whose id is the pidfd's pid.
PIDFD_SIGNAL_PROCESS_GROUP = 4

#: Tests set this to False to take the killpg path; None means "not probed yet".
pidfd_group_signals: bool | None = None


# -- in the child ---------------------------------------------------------------


def lead_own_group() -> None:
    """Make the calling process the leader of a new process group."""
    os.setpgid(0, 0)


def arm_lifeline(expected_parent: int, thread: int | None = None) -> None:
    """Be killed when the parent dies; die now if it already has.

    *expected_parent* is the pid of the process that forked us, as the parent
    recorded it.  Any other ``getppid()`` means that it died (we were handed
    to init or a subreaper) before the death signal was set.  The kernel
    sends the signal when the *thread* that forked us ends (its native id):
    if it ended before the signal was set, it is gone from the parent's
    ``/proc`` tasks, and we die now, as we would have a moment later.
    """
    import ctypes  # noqa: PLC0415 - only children that ask for it pay for it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:  # pragma: no cover
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != expected_parent or (
        thread is not None and not os.path.exists(f"/proc/{expected_parent}/task/{thread}")
    ):
        os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(expected: int) -> int:
    """A descriptor that turns readable when the parent (pid *expected*) is gone.

    A pidfd of the parent, which is ours if the parent is still *expected*
    once it is open (had it died first, we would have been handed to another
    parent before its pid could be reused); otherwise a pipe whose other end
    is closed, which reads as "gone" at once.
    """
    try:
        fd = os.pidfd_open(expected)
    except OSError:
        fd = -1
    if fd >= 0 and os.getppid() == expected:
        return fd
    if fd >= 0:
        os.close(fd)
    r, w = os.pipe()
    os.close(w)
    return r


# -- in the parent --------------------------------------------------------------


def expected_parent() -> int:
    """The pid a fork or spawn child started now must find as its parent: ours."""
    return os.getpid()


def set_group_from_parent(pid: int) -> None:
    """The parent's half of the classic double ``setpgid`` (fork children).

    Once the child has exec'd (spawn) or is not ours (forkserver), the call
    fails with EACCES or ESRCH; the child's own call makes the group then.
    """
    try:
        os.setpgid(pid, pid)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.ESRCH, errno.EPERM):
            raise


def pidfd_group_signals_work() -> bool:
    """Whether ``pidfd_send_signal`` takes PIDFD_SIGNAL_PROCESS_GROUP (probed once)."""
    global pidfd_group_signals
    if pidfd_group_signals is None:
        pidfd_group_signals = False
        if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
            try:
                fd = os.pidfd_open(os.getpid())
            except OSError:
                return False
            try:
                # Signal 0 to the group whose id is our pid: there is none (we do
                # not lead one), so a kernel that knows the flag says ESRCH.
                signal.pidfd_send_signal(fd, 0, None, PIDFD_SIGNAL_PROCESS_GROUP)
            except ProcessLookupError:
                pidfd_group_signals = True
            except OSError:
                pass  # EINVAL: a kernel before 6.9
            else:
                pidfd_group_signals = True  # pragma: no cover - we lead a group
            finally:
                os.close(fd)
    return pidfd_group_signals
