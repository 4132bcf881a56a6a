"""The child's side of ``aioproc.run``: call the function, send the outcome back.

See the theory of operation in ``_run``.  Everything here runs in the child,
except the pickling of ``Call`` (in the parent, while ``start()`` pickles the
process object for a spawn or forkserver child) and the small helpers the
parent uses to name things in its messages.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import struct
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

#: The message's header: the lengths of the meta and the body.
HEADER = struct.Struct("!QQ")


def type_name(obj: object) -> str:
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(func: Callable[..., object]) -> str:
    target: object = func
    while isinstance(target, functools.partial):
        target = target.func
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{name}()"


def _dumps(obj: object) -> memoryview:
    # multiprocessing's pickler: connections and sockets travel as they do in
    # multiprocessing's own queues and process arguments.
    return ForkingPickler.dumps(obj, pickle.HIGHEST_PROTOCOL)


class Call:
    """The function and its arguments, on their way to the child.

    A fork child inherits them as they are.  For spawn and forkserver they are
    pickled into one blob while multiprocessing pickles the process object
    (so descriptors travel the way multiprocessing passes them), which lets a
    failure name the argument at fault; the child unpickles the blob in the
    wrapper, which reports a failure to the parent instead of dying with it.
    """

    def __init__(self, func: Callable[..., object], args: tuple[Any, ...], method: str) -> None:
        self._func: Callable[..., object] | None = func
        self._args = args
        self._method = method
        self._blob: bytes | None = None

    def unpack(self) -> tuple[Callable[..., object], tuple[Any, ...]]:
        if self._blob is not None:
            func, args = pickle.loads(self._blob)
            return func, args
        if self._func is None:  # pragma: no cover - defensive
            raise RuntimeError("internal error: a call without a function")
        return self._func, self._args

    def __reduce__(self) -> tuple[Any, ...]:
        if self._func is None:  # pragma: no cover - pickled once, by start()
            raise RuntimeError("internal error: a call pickled twice")
        try:
            blob = _dumps((self._func, self._args)).tobytes()
        except Exception as exc:
            raise _unpicklable_call(self._func, self._args, self._method, exc) from exc
        return (call_from_blob, (blob,))


def call_from_blob(blob: bytes) -> Call:
    call = Call.__new__(Call)
    call._func, call._args, call._method, call._blob = None, (), "", blob
    return call


def _unpicklable_call(
    func: Callable[..., object], args: tuple[Any, ...], method: str, exc: Exception
) -> pickle.PicklingError:
    """The error for a function or argument that cannot go to a spawn/forkserver child."""
    why = f"{type_name(exc)}: {exc}"
    try:
        _dumps(func)
    except Exception:
        return pickle.PicklingError(
            f"cannot send the function {func!r} (an object of type {type_name(func)}) "
            f"to a {method} child ({why}); a {method} child receives it pickled, so "
            "pass a function defined at module level (not a lambda or a local "
            "function), or use context='fork'"
        )
    for i, arg in enumerate(args):
        try:
            _dumps(arg)
        except Exception:
            return pickle.PicklingError(
                f"cannot send argument {i} of {describe(func)} (an object of type "
                f"{type_name(arg)}) to a {method} child ({why}); a {method} child "
                "receives its arguments pickled, so pass picklable ones, or use "
                "context='fork', which does not pickle them"
            )
    return pickle.PicklingError(
        f"cannot send {describe(func)} and its arguments to a {method} child ({why}); "
        "pass a module-level function and picklable arguments, or use context='fork'"
    )


def _let_sigint_pass(signum: int, frame: object) -> None:
    """SIGINT handler of a child of ``run``: the parent decides what Ctrl-C means."""


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, _let_sigint_pass)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<str() of the {type_name(exc)} failed>"


def _format_exception(exc: BaseException) -> str:
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code is outcome_of.__code__:
        tb = tb.tb_next  # the wrapper's own frame says nothing
    return "".join(traceback.format_exception(type(exc), exc, tb))


def outcome_of(call: Call) -> tuple[tuple[Any, ...], memoryview | bytes]:
    """Call the function; return the message's meta and body."""
    try:
        func, args = call.unpack()
    except Exception as exc:
        return ("unloadable", type_name(exc), _safe_str(exc), _format_exception(exc)), b""
    try:
        value = func(*args)
    except Exception as exc:
        text = _format_exception(exc)
        try:
            body = _dumps(exc)
        except Exception as err:
            reason = f"{type_name(err)}: {err}"
            return ("raised", type_name(exc), _safe_str(exc), text, reason), b""
        return ("raised", type_name(exc), _safe_str(exc), text, None), body
    try:
        body = _dumps(value)
    except Exception as err:
        reason = f"{type_name(err)}: {err}"
        return ("unpicklable", type_name(value), reason, _format_exception(err)), b""
    return ("value", type_name(value)), body


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def child_main(send: Connection, call: Call) -> None:
    """The target of every child of ``run``."""
    _ignore_sigint()
    meta, body = outcome_of(call)
    del call
    meta_bytes = pickle.dumps(meta, pickle.HIGHEST_PROTOCOL)
    try:
        _write_all(send.fileno(), HEADER.pack(len(meta_bytes), len(body)) + meta_bytes)
        _write_all(send.fileno(), body)
    except BrokenPipeError:
        pass  # the parent stopped listening (cancelled): nobody wants the result
