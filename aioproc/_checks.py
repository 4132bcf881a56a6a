"""Validation of the arguments every public entry point takes, in one place.

The same value is accepted, and refused with the same message, wherever it
appears: a timeout of ``join``, ``run`` or ``Pool.run``, a grace period, a
flag, a start method.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.context
import sys

#: Whether ``die_with_parent=True`` can work here: Linux's PR_SET_PDEATHSIG.
PDEATHSIG_SUPPORTED = sys.platform.startswith("linux")

# A timeout this long is "forever"; a larger one would overflow some loops' timers.
_FOREVER = 1e9

#: The start methods aioproc knows how to start, watch and reap.
START_METHODS = ("fork", "spawn", "forkserver")


def _seconds(value: object, what: str, *, none_ok: bool) -> float:
    """*value* as a float number of seconds (inf for a huge one); TypeError otherwise."""
    import numbers  # noqa: PLC0415 - not for the spawn children that import this module

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        allowed = " or None" if none_ok else ""
        raise TypeError(
            f"{what} must be a real number of seconds (an int or a float){allowed}, "
            f"not {type(value).__name__}"
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int or a Fraction beyond any float
        seconds = -math.inf if value < 0 else math.inf
    if math.isnan(seconds):
        raise ValueError(f"{what} must be a number of seconds, not NaN")
    return seconds


def check_timeout(
    timeout: object, what: str = "timeout", meaning: str = "0 polls, None waits forever"
) -> float | None:
    """The timeout as a float, None for "forever"; or a clear error.

    Any real number is accepted (int, float, Fraction, numpy scalars); one too
    large for a float (``10**400``) waits forever like ``inf``.
    """
    if timeout is None:
        return None
    seconds = _seconds(timeout, what, none_ok=True)
    if seconds < 0:
        raise ValueError(f"{what} must be >= 0 ({meaning}), got {timeout!r}")
    return None if seconds >= _FOREVER else seconds


def check_grace(grace: object) -> float:
    """The grace period between SIGTERM and SIGKILL: a finite real number >= 0."""
    seconds = _seconds(grace, "grace", none_ok=False)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            "grace must be a finite number of seconds >= 0 (the wait between SIGTERM "
            f"and SIGKILL), got {grace!r}"
        )
    return seconds


def check_flag(name: str, value: object) -> bool:
    """*value* if it is a bool, else a TypeError naming the option."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__} {value!r}")
    return value


def check_die_with_parent(value: object, method: str | None) -> bool:
    """*value* as a bool, refused where it cannot hold (another OS, forkserver)."""
    wanted = check_flag("die_with_parent", value)
    if not wanted:
        return False
    if not PDEATHSIG_SUPPORTED:
        raise NotImplementedError(
            "die_with_parent=True needs Linux (prctl PR_SET_PDEATHSIG), and this is "
            f"{sys.platform}; pass die_with_parent=False, and have the child watch "
            "multiprocessing.parent_process().sentinel instead"
        )
    problem = lifeline_problem(method)
    if problem is not None:
        raise NotImplementedError(
            f"die_with_parent=True does not work with the {method} start method: "
            f"{problem}; use the fork or spawn start method"
        )
    return True


def lifeline_problem(method: str | None) -> str | None:
    """Why ``die_with_parent`` cannot hold for *method* (None: it can, or not known yet)."""
    if method is None:
        return None
    from ._popen import POPEN_CLASSES  # noqa: PLC0415 - only when asked for, as children are light

    return POPEN_CLASSES[method].lifeline_problem


#: Start method name -> its context, once resolved (every start resolves one).
_CONTEXTS: dict[str, multiprocessing.context.BaseContext] = {}


def resolve_context(context: object) -> multiprocessing.context.BaseContext | None:
    """A multiprocessing context for *context* (a name, a context, or None: the default)."""
    if context is None:
        return None
    if isinstance(context, str):
        known = _CONTEXTS.get(context)
        if known is not None:
            return known
        methods = [m for m in multiprocessing.get_all_start_methods() if m in START_METHODS]
        if context not in methods:
            raise ValueError(
                f"unknown start method {context!r}; use one of {', '.join(methods)} "
                "or a multiprocessing context"
            )
        known = _CONTEXTS[context] = multiprocessing.get_context(context)
        return known
    if isinstance(context, multiprocessing.context.BaseContext):
        method = context.get_start_method()
        if method not in START_METHODS:
            raise ValueError(
                f"the context {context!r} starts children with {method!r}; aioproc "
                f"starts them with {', '.join(START_METHODS)}: pass one of those"
            )
        return context
    raise TypeError(
        "context must be a start method name, a multiprocessing context or None, "
        f"not {type(context).__name__}"
    )


def start_method_of(context: multiprocessing.context.BaseContext | None) -> str:
    """The start method a child created with *context* will use (None: the default)."""
    ctx = context if context is not None else multiprocessing.get_context()
    method = ctx.get_start_method()
    if method not in START_METHODS:  # pragma: no cover - a default set by someone else
        raise ValueError(
            f"the default start method is {method!r}; aioproc starts children with "
            f"{', '.join(START_METHODS)}: pass context= one of those"
        )
    return method
