"""Frames between a parent and a child of ``run`` or a ``Pool`` worker, and outcomes.

Theory of operation.  One message is a *frame*::

    header   !QQI   meta length, body length, number of out-of-band buffers
    table    !QB    per buffer: its length, and whether it is read-only
    meta            a small pickle (strings, numbers, tuples): what happened
    body            a pickle (protocol 5) of the value, exception or call
    buffers         the out-of-band buffers, raw, one after the other

The body is pickled with multiprocessing's pickler and protocol 5, with a
``buffer_callback``: every object that hands pickle a ``PickleBuffer`` (numpy
arrays, for example) travels out of band, as its raw bytes, never copied into
the pickle.  ``bytes``, ``bytearray`` and contiguous ``memoryview`` objects of
``OUT_OF_BAND_MIN`` bytes or more are made to travel that way too when they are
the object sent or one of its items (a call's arguments, a list or tuple of
results): pickle offers no hook for ``bytes`` deeper in a structure, and those
are copied into the body as usual.

The sender writes the frame's parts with ``writev`` as the pipe drains; the
receiver reads the header, then the table, meta and body, then each buffer
straight into the object that will hold it: a ``bytes`` or ``bytearray`` the
size of the buffer, allocated without being filled (``PyBytes_FromStringAndSize``
and ``PyByteArray_FromStringAndSize`` with no source, through ctypes, on
CPython), so that its pages are touched only as the data arrives, a pipe's
worth at a time.  Unpickling hands those objects to pickle as they are: a
``bytes`` argument arrives as the ``bytes`` object it was read into, no copy.
In the event loop's thread (``send`` and ``receive``) each wake-up moves at most
``BUDGET`` bytes before yielding, so a 100 MiB payload never holds the loop
for longer than one such slice.

An *outcome* is what a call produced, as a frame's meta and body: the value,
the exception (with its type's name, message and traceback text in the meta,
so that one that cannot be pickled still comes back with a name), or why the
value or the call could not cross.  ``outcome_of`` makes it in the child,
``result_of`` turns it back into a value or an exception in the parent.
"""

from __future__ import annotations

import collections
import contextlib
import copyreg
import errno
import fcntl
import functools
import io
import multiprocessing
import os
import pickle
import signal
import struct
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any

from ._exceptions import ProcessDied, RemoteError, RemoteTraceback

if TYPE_CHECKING:
    from ._usage import ResourceUsage

HEADER = struct.Struct("!QQI")
ENTRY = struct.Struct("!QB")
#: bytes-like objects at least this large travel out of band.
OUT_OF_BAND_MIN = 1 << 16
#: Bytes moved per wake-up in the event loop before it yields.
BUDGET = 1 << 19
_BIG = 1 << 20  # a frame with more than this gets a larger pipe (Linux)...
_BIG_PIPE = 1 << 20  # ... this large: the default limit for unprivileged users
_IOV_MAX = 512
_PROTOCOL = 5


# -- naming things in messages --------------------------------------------------------


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


def how_it_ended(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:  # a real-time signal has no name of its own
        name = f"signal {-code}"
    return f"died with {name} (exit code {code})"


def check_call(func: object, kwargs: dict[str, Any], caller: str) -> None:
    """Refuse what cannot be called in a child: not a callable, an async function,
    keyword arguments (*caller* names the API: "run", "Pool.run")."""
    import inspect  # noqa: PLC0415 - the parent's side only: 5 ms a child would pay

    if not callable(func):
        raise TypeError(
            f"func must be a callable, not {type(func).__name__}; "
            f"call {caller}(func, *args) with the function first"
        )
    if inspect.iscoroutinefunction(func):
        raise TypeError(
            f"{describe(func)} is an async function; {caller}() calls a plain function in "
            "the child. Pass a plain function that runs its own event loop, e.g. "
            "functools.partial(anyio.run, func)"
        )
    if kwargs:
        name = next(iter(kwargs))
        target = describe(func)[:-2]
        raise TypeError(
            f"{caller}() got an unexpected keyword argument {name!r}; keyword arguments "
            f"for {describe(func)} go through functools.partial: "
            f"{caller}(functools.partial({target}, {name}=...), *args)"
        )


# -- pickling with out-of-band buffers --------------------------------------------------


def _same(obj: object) -> object:
    return obj


def _as_memoryview(buf: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    flat: Any = memoryview(buf).cast("B")
    view: memoryview = flat.cast(fmt, shape)
    return view


class _OutOfBand:
    """Stands in for a large bytes-like object so that pickle sends it out of band."""

    __slots__ = ("obj",)

    def __init__(self, obj: bytes | bytearray | memoryview) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        obj = self.obj
        if isinstance(obj, memoryview):
            return (_as_memoryview, (pickle.PickleBuffer(obj), obj.format, obj.shape))
        return (_same, (pickle.PickleBuffer(obj),))


def _large(obj: object) -> bool:
    kind = type(obj)
    if kind is bytes or kind is bytearray:
        return len(obj) >= OUT_OF_BAND_MIN  # type: ignore[arg-type]
    if kind is memoryview:
        view: memoryview = obj  # type: ignore[assignment]
        return (
            view.nbytes >= OUT_OF_BAND_MIN
            and view.c_contiguous
            and len(view.format.lstrip("@")) == 1
        )
    return False


def _marked(obj: object) -> object:
    """*obj*, with its large bytes-like items (or itself) marked to go out of band."""
    if _large(obj):
        return _OutOfBand(obj)  # type: ignore[arg-type]
    kind = type(obj)
    if (kind is tuple or kind is list) and any(_large(item) for item in obj):  # type: ignore[attr-defined]
        items = [_OutOfBand(item) if _large(item) else item for item in obj]  # type: ignore[attr-defined]
        return tuple(items) if kind is tuple else items
    return obj


class _Pickler(pickle.Pickler):
    """multiprocessing's pickler (its reducers for connections, sockets...), protocol 5.

    Its table is a live view of copyreg's and multiprocessing's, built once
    rather than copied per pickler as ``ForkingPickler`` does.
    """

    dispatch_table = collections.ChainMap(  # noqa: RUF012 - shared on purpose
        ForkingPickler._extra_reducers,  # type: ignore[attr-defined]
        copyreg.dispatch_table,  # type: ignore[arg-type]
    )

    def __init__(self, file: io.BytesIO, buffers: list[pickle.PickleBuffer]) -> None:
        super().__init__(file, _PROTOCOL, buffer_callback=buffers.append)


def dumps(obj: object) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """*obj* pickled: the body, and the buffers that go out of band."""
    buffers: list[pickle.PickleBuffer] = []
    file = io.BytesIO()
    _Pickler(file, buffers).dump(_marked(obj))
    return file.getvalue(), buffers


def dumps_call(func: Callable[..., object], args: tuple[Any, ...]) -> tuple[bytes, list[Any]]:
    """The call pickled, its large arguments out of band (``_marked`` per argument)."""
    buffers: list[pickle.PickleBuffer] = []
    file = io.BytesIO()
    _Pickler(file, buffers).dump((func, tuple(_marked(arg) for arg in args)))
    return file.getvalue(), buffers


def unpicklable_call(
    func: Callable[..., object], args: tuple[Any, ...], exc: Exception, *, to: str, fix: str
) -> pickle.PicklingError:
    """The error for a function or argument that cannot be sent *to* a process.

    *to* names the receiver ("a spawn child"), *fix* is appended to the advice
    about arguments ("or use context='fork', which does not pickle them").
    """
    why = f"{type_name(exc)}: {exc}"
    try:
        ForkingPickler.dumps(func, _PROTOCOL)
    except Exception:
        return pickle.PicklingError(
            f"cannot send the function {func!r} (an object of type {type_name(func)}) "
            f"to {to} ({why}); {to} receives it pickled, so pass a function defined at "
            "module level (not a lambda or a local function)" + fix
        )
    for i, arg in enumerate(args):
        try:
            dumps(arg)
        except Exception:
            return pickle.PicklingError(
                f"cannot send argument {i} of {describe(func)} (an object of type "
                f"{type_name(arg)}) to {to} ({why}); {to} receives its arguments "
                "pickled, so pass picklable ones" + fix
            )
    return pickle.PicklingError(
        f"cannot send {describe(func)} and its arguments to {to} ({why}); pass a "
        "module-level function and picklable arguments" + fix
    )


def loads(body: bytes | bytearray | memoryview, buffers: list[Any]) -> Any:
    return pickle.loads(body, buffers=buffers)


def pipe(user: str) -> tuple[Connection, Connection]:
    """A one-way pipe for a child of *user*; running out of descriptors is explained."""
    try:
        return multiprocessing.Pipe(duplex=False)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        name = errno.errorcode[exc.errno]
        raise OSError(
            exc.errno,
            f"{user} could not create a pipe to its child: too many open files ({name}); "
            "nothing was started; close file descriptors or raise RLIMIT_NOFILE",
        ) from exc


# -- frames -------------------------------------------------------------------------------


_NONE = pickle.dumps(None, _PROTOCOL)


def frame(meta: object, body: bytes = b"", buffers: list[pickle.PickleBuffer] = ()) -> list[Any]:  # type: ignore[assignment]
    """The parts of a frame, ready for ``writev``."""
    meta_bytes = _NONE if meta is None else pickle.dumps(meta, _PROTOCOL)
    if not buffers:
        return [HEADER.pack(len(meta_bytes), len(body), 0) + meta_bytes, body]
    raws = [buf.raw() for buf in buffers]
    table = b"".join(ENTRY.pack(raw.nbytes, raw.readonly) for raw in raws)
    return [HEADER.pack(len(meta_bytes), len(body), len(raws)) + table + meta_bytes, body, *raws]


def _slice(views: list[memoryview], budget: float) -> list[memoryview]:
    """The first views, cut to about *budget* bytes: one system call moves no more."""
    first = views[0]
    if len(first) >= budget:
        return [first[: int(budget)]]
    return views[:_IOV_MAX]


class Outgoing:
    """A frame being written; ``write_some`` on a blocking or non-blocking pipe."""

    __slots__ = ("_parts", "size")

    def __init__(self, parts: list[Any]) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts if len(p)]
        self.size = sum(len(p) for p in self._parts)

    def write_some(self, fd: int, budget: float) -> bool | None:
        """Write up to about *budget* bytes: True when done, False if the pipe is full,
        None when the budget ran out."""
        parts = self._parts
        moved = 0
        while parts:
            try:
                n = os.writev(fd, _slice(parts, budget))
            except BlockingIOError:
                return False
            moved += n
            while n:
                first = parts[0]
                if n >= len(first):
                    n -= len(first)
                    first.release()
                    del parts[0]
                else:
                    parts[0] = first[n:]
                    n = 0
            if moved >= budget and parts:
                return None
        return True

    def release(self) -> None:
        for part in self._parts:
            part.release()
        self._parts = []


def grow_pipe(fd: int, size: int) -> None:
    # Fewer, larger reads and writes for a big frame (a third faster for 100 MB here).
    # Only then: a larger pipe counts against the user's pipe-buffer quota.
    if size > _BIG:
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _BIG_PIPE)


_alloc: tuple[Any, Any, int] | None = None


def _allocators() -> tuple[Any, Any, int]:
    """PyBytes_FromStringAndSize and PyByteArray_FromStringAndSize, for NULL sources."""
    global _alloc
    if _alloc is None:
        import ctypes  # noqa: PLC0415 - only for the first large buffer received

        new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
        new_bytes.restype = ctypes.py_object
        new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
        new_bytearray.restype = ctypes.py_object
        new_bytearray.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        _alloc = (new_bytes, new_bytearray, bytes.__basicsize__ - 1)  # offset of ob_sval
    return _alloc


def _unfilled(size: int, readonly: bool) -> tuple[object, Any]:
    """A bytes (*readonly*) or bytearray of *size* bytes, and a writable view of it.

    A large one is allocated without being filled, so that its pages are touched
    only as the data arrives; a small one, or one on another interpreter than
    CPython, is a bytearray (turned into bytes once filled: a copy).
    """
    if size < OUT_OF_BAND_MIN or sys.implementation.name != "cpython":
        buf = bytearray(size)
        return buf, buf
    new_bytes, new_bytearray, data_offset = _allocators()
    if readonly:
        import ctypes  # noqa: PLC0415

        obj = new_bytes(None, size)
        return obj, (ctypes.c_ubyte * size).from_address(id(obj) + data_offset)
    obj = new_bytearray(None, size)
    return obj, obj


class Incoming:
    """A frame being read; ``read_some`` on a blocking or non-blocking pipe."""

    __slots__ = ("_bufs", "_head", "_n", "_payload", "_pending", "_phase", "meta_len", "objects")

    def __init__(self) -> None:
        self._head = bytearray(HEADER.size)
        self._pending: list[memoryview] = [memoryview(self._head)]
        self._phase = 0
        self._n = 0
        self.meta_len = 0
        self._payload = bytearray()
        self._bufs: list[tuple[object, int, bool]] = []
        self.objects: list[object] = []

    @property
    def complete(self) -> bool:
        return self._phase == 3

    def read_some(self, fd: int, budget: float) -> bool | None:
        """Read up to about *budget* bytes.  True: the frame is complete.  False: the
        pipe is empty (or at its end: see ``eof``).  None: the budget ran out."""
        moved = 0
        while self._phase != 3:
            pending = self._pending
            try:
                n = os.readv(fd, _slice(pending, budget))
            except BlockingIOError:
                return False
            if n == 0:
                self._phase = 4  # end of file before the frame was complete
                return False
            moved += n
            while n:
                first = pending[0]
                if n >= len(first):
                    n -= len(first)
                    first.release()
                    del pending[0]
                else:
                    pending[0] = first[n:]
                    n = 0
            if not pending:
                self._advance(fd)
            elif moved >= budget:
                return None
        return True

    @property
    def eof(self) -> bool:
        return self._phase == 4

    def _advance(self, fd: int) -> None:
        if self._phase == 0:
            meta_len, body_len, self._n = HEADER.unpack(self._head)
            self.meta_len = meta_len
            self._payload = bytearray(ENTRY.size * self._n + meta_len + body_len)
            self._phase = 1
            if self._payload:
                self._pending = [memoryview(self._payload)]
                return
        if self._phase == 1:
            table = self._n * ENTRY.size
            total = 0
            views: list[memoryview] = []
            for i in range(self._n):
                size, readonly = ENTRY.unpack_from(self._payload, i * ENTRY.size)
                obj, target = _unfilled(size, bool(readonly))
                self._bufs.append((obj, size, bool(readonly)))
                total += size
                if size:
                    views.append(memoryview(target).cast("B"))
            del self._payload[:table]
            self._phase = 2
            if views:
                grow_pipe(fd, total)
                self._pending = views
                return
        self.objects = [
            bytes(obj) if readonly and isinstance(obj, bytearray) else obj
            for obj, size, readonly in self._bufs
        ]
        self._bufs = []
        self._phase = 3

    def meta(self) -> Any:
        return pickle.loads(memoryview(self._payload)[: self.meta_len])

    def body(self) -> memoryview:
        return memoryview(self._payload)[self.meta_len :]


def write_blocking(fd: int, parts: list[Any]) -> None:
    out = Outgoing(parts)
    grow_pipe(fd, out.size)
    while out.write_some(fd, float("inf")) is not True:  # pragma: no cover - blocking fd
        pass


def read_blocking(fd: int) -> Incoming | None:
    """The next frame from a blocking pipe; None at its end."""
    inc = Incoming()
    while inc.read_some(fd, float("inf")) is not True:
        if inc.eof:
            return None
    return inc


async def send(fd: int, parts: list[Any]) -> None:
    """Write a frame to the non-blocking pipe *fd*, yielding as ``BUDGET`` says."""
    import anyio  # noqa: PLC0415 - the parent's side only
    import anyio.lowlevel  # noqa: PLC0415

    out = Outgoing(parts)
    grow_pipe(fd, out.size)
    try:
        while True:
            done = out.write_some(fd, BUDGET)
            if done:
                return
            if done is None:
                await anyio.lowlevel.checkpoint()
            else:
                await anyio.wait_writable(fd)
    finally:
        out.release()


async def receive(fd: int, inc: Incoming, *, wait_first: bool = False) -> bool:
    """Read a frame from the non-blocking pipe *fd*: True once complete, False at EOF."""
    import anyio  # noqa: PLC0415 - the parent's side only
    import anyio.lowlevel  # noqa: PLC0415

    if wait_first:
        await anyio.wait_readable(fd)
    while True:
        done = inc.read_some(fd, BUDGET)
        if done:
            return True
        if inc.eof:
            return False
        if done is None:
            await anyio.lowlevel.checkpoint()
        else:
            await anyio.wait_readable(fd)


# -- outcomes -----------------------------------------------------------------------------


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<str() of the {type_name(exc)} failed>"


def format_exception(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code in _OWN_FRAMES:
        tb = tb.tb_next  # the wrapper's own frames say nothing
    return "".join(traceback.format_exception(type(exc), exc, tb))


def exception_outcome(exc: BaseException) -> tuple[tuple[Any, ...], bytes, list[Any]]:
    """An exception as an outcome: meta, body and buffers."""
    text = format_exception(exc)
    try:
        body, buffers = dumps(exc)
    except Exception as err:
        reason = f"{type_name(err)}: {err}"
        return ("raised", type_name(exc), _safe_str(exc), text, reason), b"", []
    return ("raised", type_name(exc), _safe_str(exc), text, None), body, buffers


def unloadable_outcome(exc: BaseException) -> tuple[tuple[Any, ...], bytes, list[Any]]:
    return ("unloadable", type_name(exc), _safe_str(exc), format_exception(exc)), b"", []


def outcome_of(
    func: Callable[..., object], args: tuple[Any, ...]
) -> tuple[tuple[Any, ...], bytes, list[Any]]:
    """Call the function; return the outcome's meta, body and buffers."""
    try:
        value = func(*args)
    except (SystemExit, KeyboardInterrupt):
        raise  # the child ends, as a multiprocessing child would: ProcessDied
    except BaseException as exc:  # any other type comes back as itself
        return exception_outcome(exc)
    try:
        body, buffers = dumps(value)
    except Exception as err:
        reason = f"{type_name(err)}: {err}"
        return ("unpicklable", type_name(value), reason, format_exception(err)), b"", []
    return ("value", type_name(value)), body, buffers


_OWN_FRAMES = {outcome_of.__code__}


def rebuilt_exception(
    body: memoryview,
    buffers: list[Any],
    *,
    name: str,
    message: str,
    text: str,
    usage: ResourceUsage | None,
) -> BaseException:
    """The child's exception, or a RemoteError standing in for it; the traceback as cause."""
    rebuilt: object = None
    if body:
        # SystemExit too: a reconstructor that calls sys.exit() must not end the
        # parent.  Not KeyboardInterrupt: that one is the user's Ctrl-C.
        with contextlib.suppress(Exception, SystemExit):
            rebuilt = loads(body, buffers)
    exc = rebuilt if isinstance(rebuilt, BaseException) else RemoteError(name, message, text)
    exc.__cause__ = RemoteTraceback(text, usage)
    return exc


def result_of(
    func: Callable[..., object],
    pid: int,
    inc: Incoming,
    usage: ResourceUsage | None,
    meta: tuple[Any, ...] | None = None,
) -> Any:
    """The value of a complete outcome frame, or raise what it says."""
    if meta is None:
        meta = inc.meta()
    body = inc.body()
    kind, name = meta[0], meta[1]
    if kind == "value":
        try:
            return loads(body, inc.objects)
        except (Exception, SystemExit) as exc:  # as in rebuilt_exception
            raise pickle.UnpicklingError(
                f"the result of {describe(func)} (an object of type {name}) came "
                f"back from process {pid} but cannot be unpickled here "
                f"({type_name(exc)}: {exc}); return a type the parent can import"
            ) from exc
    if kind == "raised":
        raise rebuilt_exception(
            body, inc.objects, name=name, message=meta[2], text=meta[3], usage=usage
        )
    error: pickle.PickleError
    if kind == "unpicklable":
        error = pickle.PicklingError(
            f"the result of {describe(func)} in process {pid} (an object of type "
            f"{name}) cannot be pickled to send it back ({meta[2]}); return a "
            "picklable value, for example the data needed to rebuild the object"
        )
    else:  # "unloadable"
        error = pickle.UnpicklingError(
            f"process {pid} could not unpickle {describe(func)} or its arguments "
            f"({name}: {meta[2]}); a spawn or forkserver child imports them by "
            "name, so define them in a module it can import (not in a script run "
            "with -c or an interactive session), or use context='fork'"
        )
    error.__cause__ = RemoteTraceback(meta[3], usage)
    raise error


def died(
    func: Callable[..., object],
    pid: int,
    code: int,
    usage: ResourceUsage | None,
    *,
    started: bool,
    method: str,
    what: str = "process",
) -> ProcessDied:
    """The error for a child that exited without a complete outcome."""
    if started:
        message = (
            f"{what} {pid} running {describe(func)} {how_it_ended(code)} before returning a result"
        )
    else:
        message = f"{what} {pid} {how_it_ended(code)} before it started running {describe(func)}"
        from ._popen import POPEN_CLASSES  # noqa: PLC0415 - the parent's side only

        if not POPEN_CLASSES[method].inherits_memory:  # it imports the main module first
            message += (
                f" (a {method} child first imports the main module; if that module starts "
                'processes when imported, with no `if __name__ == "__main__":` guard, the '
                "child fails there: put the program's entry point under that guard; the "
                "child's error is on its stderr)"
            )
    if code == -signal.SIGKILL:
        message += " (SIGKILL: the out-of-memory killer, or another process, killed it)"
    return ProcessDied(message, pid=pid, exitcode=code, resource_usage=usage)
