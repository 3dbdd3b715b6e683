"""The tier0 client: files by path, read striped from the data daemons, over libtier0."""

import contextlib
import os
import threading
import weakref

import numpy as np

from ._native import ffi, lib


class Error(Exception):
    """A failed tier0 call; ``code`` is the C ABI's ``tier0_result``, the message its
    ``tier0_last_error()`` (the function, the path, the cause)."""

    code = None

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(Error, ValueError):
    code = lib.TIER0_INVALID_ARGUMENT


class NotFound(Error, FileNotFoundError):
    code = lib.TIER0_NOT_FOUND


class AlreadyExists(Error, FileExistsError):
    code = lib.TIER0_ALREADY_EXISTS


class Unauthenticated(Error, PermissionError):
    code = lib.TIER0_UNAUTHENTICATED


class Unavailable(Error, ConnectionError):
    code = lib.TIER0_UNAVAILABLE


class BufferTooSmall(Error, ValueError):
    code = lib.TIER0_BUFFER_TOO_SMALL


class IoError(Error, OSError):
    code = lib.TIER0_IO


class Conflict(Error):
    code = lib.TIER0_CONFLICT


class RingFull(Error):
    code = lib.TIER0_RING_FULL


class OutOfMemory(Error, MemoryError):
    code = lib.TIER0_OUT_OF_MEMORY


class InternalError(Error):
    code = lib.TIER0_INTERNAL


class Stale(Error):
    """An open file's version can no longer be read (no longer kept, or the path now names
    another file): open the file again for its current version."""

    code = lib.TIER0_STALE


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Unauthenticated,
        Unavailable,
        BufferTooSmall,
        IoError,
        Conflict,
        RingFull,
        OutOfMemory,
        InternalError,
        Stale,
    )
}


def _raise(code, message=None):
    if message is None:
        message = ffi.string(lib.tier0_last_error()).decode("utf-8", "replace")
    if not message:
        message = ffi.string(lib.tier0_strerror(code)).decode()
    raise _BY_CODE.get(code, Error)(message, code)


def _check(code):
    if code != lib.TIER0_OK:
        _raise(code)


def _path(path):
    if not isinstance(path, str):
        raise InvalidArgument(f"path must be a str, not {type(path).__name__}", lib.TIER0_INVALID_ARGUMENT)
    return path.encode()


def _stat_dict(path, info):
    kind = "directory" if info.kind == lib.TIER0_KIND_DIRECTORY else "file"
    return {
        "name": path,
        "type": kind,
        "size": info.size,
        "version": info.version,
        "id": info.id,
        "created_ms": info.created_ms,
        "modified_ms": info.modified_ms,
        "chunk_size": info.chunk_size,
        "replication": info.replication,
    }


class Buffer:
    """Registered memory that batched reads land in without a copy (``tier0_buffer``).

    ``array`` is a ``numpy.uint8`` view of the very bytes the daemons' reads land in; views
    returned by :meth:`Client.read_batch` are slices of it. The memory stays mapped while any
    view of it lives. ``numa_node=-1`` leaves placement to the kernel; a node number binds
    the pages to that node.
    """

    def __init__(self, nbytes, numa_node=-1):
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise InvalidArgument(f"nbytes must be a positive int, not {nbytes!r}", lib.TIER0_INVALID_ARGUMENT)
        out = ffi.new("tier0_buffer **")
        _check(lib.tier0_buffer_new(nbytes, numa_node, out))
        handle = out[0]
        # The data pointer owns the handle: numpy's views keep the cffi buffer alive, which
        # keeps this pointer alive, whose collection frees the handle.
        self._data = ffi.gc(lib.tier0_buffer_data(handle), lambda _: lib.tier0_buffer_free(handle))
        self._handle = handle
        self.nbytes = nbytes
        self.array = np.frombuffer(ffi.buffer(self._data, nbytes), dtype=np.uint8)

    def __len__(self):
        return self.nbytes

    @property
    def address(self):
        """The buffer's first byte, as an int."""
        return int(ffi.cast("uintptr_t", self._data))


class _Native:
    """A native handle that may be closed while other threads call through it: calls in
    flight are counted under a lock, and the handle is freed when the last one returns
    (never under a call). Calls after ``close`` raise :class:`InvalidArgument`."""

    def __init__(self, raw, free, what):
        self._raw = ffi.gc(raw, free)
        self._lock = threading.Lock()
        self._calls = 0
        self._closing = False
        self._what = what

    @contextlib.contextmanager
    def use(self):
        with self._lock:
            if self._closing:
                raise InvalidArgument(f"{self._what} is closed", lib.TIER0_INVALID_ARGUMENT)
            self._calls += 1
        try:
            yield self._raw
        finally:
            with self._lock:
                self._calls -= 1
                raw = self._take()
            if raw is not None:
                ffi.release(raw)

    def _take(self):
        """The handle to free now, if it is to be freed (the lock held)."""
        if self._closing and self._calls == 0 and self._raw is not None:
            raw, self._raw = self._raw, None
            return raw
        return None

    def close(self):
        with self._lock:
            self._closing = True
            raw = self._take()
        if raw is not None:
            ffi.release(raw)

    @property
    def closed(self):
        return self._closing


class File:
    """A file opened at one version (:meth:`Client.open`): every read returns that
    version's bytes, and :attr:`size` is that version's size, whatever another writer
    commits at the path meanwhile. :class:`Stale` when that version is no longer kept.
    Thread-safe; close it (or use ``with``) to release it."""

    def __init__(self, client, path):
        out = ffi.new("tier0_file **")
        with client._native.use() as handle:
            _check(lib.tier0_file_open(handle, _path(path), out))
        self._native = _Native(out[0], lib.tier0_file_close, f"tier0.File({path!r})")
        info = ffi.new("tier0_file_version *")
        with self._native.use() as handle:
            _check(lib.tier0_file_info(handle, info))
        self.path = path
        self.id = info.id
        self.version = info.version
        self.size = info.size

    def __repr__(self):
        return f"tier0.File({self.path!r}, version={self.version}, size={self.size})"

    def read_at(self, offset, length):
        """Up to ``length`` bytes at ``offset`` of the opened version (fewer at its end)."""
        data = bytearray(length)
        got = self.readinto_at(offset, data)
        return bytes(memoryview(data)[:got])

    def readinto_at(self, offset, array):
        """Reads at ``offset`` into ``array`` (any writable, C-contiguous buffer), as many
        bytes as it holds or the version has; returns how many landed."""
        view = memoryview(array)
        if not view.contiguous or view.readonly:
            raise InvalidArgument("array must be writable and C-contiguous", lib.TIER0_INVALID_ARGUMENT)
        if offset < 0:
            raise InvalidArgument(f"offset {offset} must not be negative", lib.TIER0_INVALID_ARGUMENT)
        got = ffi.new("size_t *")
        target = ffi.from_buffer(view, require_writable=True)
        with self._native.use() as handle:
            _check(lib.tier0_file_read_at(handle, offset, target, view.nbytes, got))
        return got[0]

    def close(self):
        self._native.close()

    @property
    def closed(self):
        return self._native.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Writer:
    """A new version of a file being written (:meth:`Client.create`): bytes go to the data
    daemons chunk by chunk as they fill, and :meth:`commit` publishes them atomically;
    :meth:`discard` (or leaving a ``with`` block by an exception) commits nothing."""

    def __init__(self, client, path):
        out = ffi.new("tier0_writer **")
        with client._native.use() as handle:
            _check(lib.tier0_writer_new(handle, _path(path), out))
        self._native = _Native(out[0], lib.tier0_writer_free, f"tier0.Writer({path!r})")
        self.path = path

    def __repr__(self):
        return f"tier0.Writer({self.path!r})"

    def write(self, data):
        """Appends ``data`` (any C-contiguous bytes-like object)."""
        view = memoryview(data)
        if not view.contiguous:
            raise InvalidArgument("data must be C-contiguous", lib.TIER0_INVALID_ARGUMENT)
        if view.nbytes == 0:
            return
        with self._native.use() as handle:
            _check(lib.tier0_writer_write(handle, ffi.from_buffer(view), view.nbytes))

    def commit(self):
        """Publishes what was written as the file's new version; returns its size."""
        size = ffi.new("uint64_t *")
        try:
            with self._native.use() as handle:
                _check(lib.tier0_writer_close(handle, size))
        finally:
            self._native.close()
        return size[0]

    def discard(self):
        """Commits nothing and releases the writer."""
        self._native.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.commit()
        else:
            self.discard()


# Every open client, so that a test harness can close them all before it stops a cluster.
_OPEN = weakref.WeakSet()


class Client:
    """A connection to a tier0 cluster. ``control`` and ``token`` default to the
    ``TIER0_CONTROL`` and ``TIER0_TOKEN`` environment variables (``tier0 cluster up`` prints
    them). Thread-safe; calls release the GIL. :meth:`close` may be called while other
    threads are inside calls: the native handle is freed when the last of them returns."""

    def __init__(self, control=None, token=None):
        control = control if control is not None else os.environ.get("TIER0_CONTROL")
        token = token if token is not None else os.environ.get("TIER0_TOKEN")
        if not control:
            raise InvalidArgument("no control plane: pass control= or set TIER0_CONTROL", lib.TIER0_INVALID_ARGUMENT)
        if not token:
            raise InvalidArgument("no cluster token: pass token= or set TIER0_TOKEN", lib.TIER0_INVALID_ARGUMENT)
        out = ffi.new("tier0_client **")
        _check(lib.tier0_client_new(control.encode(), token.encode(), out))
        self._native = _Native(out[0], lib.tier0_client_free, "tier0.Client")
        self.control = control
        _OPEN.add(self)

    def __repr__(self):
        return f"tier0.Client({self.control!r})"

    def close(self):
        """Drops the connections now, or when the calls other threads have in flight
        return (else when the client is collected); calls after it raise
        :class:`InvalidArgument`. Files opened from it stay readable until closed."""
        self._native.close()

    def open(self, path):
        """Opens the file's current version: a :class:`File` pinned to it."""
        return File(self, path)

    def create(self, path):
        """Starts a new version of ``path``: a :class:`Writer`, committed by ``commit``
        (or at the end of a ``with`` block), streamed to the daemons as it is written."""
        return Writer(self, path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # The namespace.

    def stat(self, path):
        """The entry at ``path``: a dict with name, type ("file" or "directory"), size,
        version, id, created_ms, modified_ms, chunk_size, replication."""
        info = ffi.new("tier0_info *")
        with self._native.use() as handle:
            _check(lib.tier0_stat(handle, _path(path), info))
        return _stat_dict(path, info)

    def ls(self, path):
        """The entries of the directory at ``path``, as :meth:`stat` dicts named by their
        full path."""
        out = ffi.new("tier0_listing **")
        with self._native.use() as handle:
            _check(lib.tier0_list(handle, _path(path), out))
        listing = ffi.gc(out[0], lib.tier0_listing_free)
        entry = ffi.new("tier0_entry *")
        prefix = path.rstrip("/")
        entries = []
        for index in range(lib.tier0_listing_len(listing)):
            _check(lib.tier0_listing_get(listing, index, entry))
            name = ffi.string(entry.name).decode()
            entries.append(_stat_dict(f"{prefix}/{name}", entry.stat))
        return entries

    def mkdir(self, path, parents=False):
        with self._native.use() as handle:
            _check(lib.tier0_mkdir(handle, _path(path), parents))

    def remove(self, path, recursive=False):
        """Removes a file or a directory (a non-empty one only with ``recursive``); returns
        how many entries went."""
        removed = ffi.new("uint64_t *")
        with self._native.use() as handle:
            _check(lib.tier0_remove(handle, _path(path), recursive, removed))
        return removed[0]

    def size(self, path):
        """The file's size in the layout this client has cached for it."""
        out = ffi.new("uint64_t *")
        with self._native.use() as handle:
            _check(lib.tier0_file_size(handle, _path(path), out))
        return out[0]

    # Reads and writes.

    def read(self, path):
        """The whole file, as bytes."""
        encoded = _path(path)
        got = ffi.new("size_t *")
        for _ in range(3):
            size = self.size(path)
            data = bytearray(size)
            with self._native.use() as handle:
                code = lib.tier0_read_file(handle, encoded, ffi.from_buffer(data), size, got)
            if code == lib.TIER0_BUFFER_TOO_SMALL:
                continue  # a new, larger version arrived between the two calls
            _check(code)
            return bytes(memoryview(data)[: got[0]])
        _raise(code)

    def read_range(self, path, offset, length):
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file), as bytes."""
        data = bytearray(length)
        got = self._read_range_into(path, offset, data, length)
        return bytes(memoryview(data)[:got])

    def _read_range_into(self, path, offset, target, length):
        if offset < 0 or length < 0:
            raise InvalidArgument(f"offset {offset} and length {length} must not be negative", lib.TIER0_INVALID_ARGUMENT)
        got = ffi.new("size_t *")
        target = ffi.from_buffer(target, require_writable=True)
        with self._native.use() as handle:
            _check(lib.tier0_read_range(handle, _path(path), offset, target, length, got))
        return got[0]

    def read_into(self, path, array, offset=0, length=None):
        """Reads ``length`` bytes (default: the rest of the file) at ``offset`` into
        ``array`` (any writable, C-contiguous buffer: a numpy array, a bytearray); returns
        how many bytes landed. :class:`BufferTooSmall` when they do not fit."""
        view = memoryview(array)
        if not view.contiguous or view.readonly:
            raise InvalidArgument("array must be writable and C-contiguous", lib.TIER0_INVALID_ARGUMENT)
        nbytes = view.nbytes
        if length is None:
            size = self.size(path)
            if offset > size:
                raise InvalidArgument(f"{path}: offset {offset} is past its end ({size} bytes)", lib.TIER0_INVALID_ARGUMENT)
            length = size - offset
        if length > nbytes:
            raise BufferTooSmall(f"{path}: {length} bytes do not fit the array's {nbytes}", lib.TIER0_BUFFER_TOO_SMALL)
        return self._read_range_into(path, offset, view, length)

    def write(self, path, data):
        """Writes ``data`` (any bytes-like object) as the new version of ``path`` and
        commits it: readers see the old version or all of the new one."""
        view = memoryview(data)
        if not view.contiguous:
            raise InvalidArgument("data must be C-contiguous", lib.TIER0_INVALID_ARGUMENT)
        source = ffi.from_buffer(view) if view.nbytes else ffi.NULL
        with self._native.use() as handle:
            _check(lib.tier0_write_file(handle, _path(path), source, view.nbytes))

    def read_batch(self, reads, buffer, align=64):
        """Reads many ranges of many files in one striped pass straight into ``buffer`` (a
        :class:`Buffer`), through a submission ring; no copy.

        ``reads`` holds ``(path, offset, length)`` tuples, laid out one after another in the
        buffer (each start aligned to ``align`` bytes), or ``(path, offset, length,
        buffer_offset)`` tuples placed where they say. Returns a numpy ``uint8`` view of the
        buffer per read, in order, as long as the bytes that landed (shorter at the end of
        a file). The first read that failed raises its error.
        """
        if not isinstance(buffer, Buffer):
            raise InvalidArgument("buffer must be a tier0.Buffer", lib.TIER0_INVALID_ARGUMENT)
        reads = list(reads)
        if not reads:
            return []
        placed = []
        cursor = 0
        for read in reads:
            if len(read) == 4:
                path, offset, length, at = read
            elif len(read) == 3:
                path, offset, length = read
                at = -(-cursor // align) * align
            else:
                raise InvalidArgument(f"a read is (path, offset, length[, buffer_offset]), not {read!r}", lib.TIER0_INVALID_ARGUMENT)
            if offset < 0 or length < 0 or at < 0:
                raise InvalidArgument(f"{read!r}: offsets and lengths must not be negative", lib.TIER0_INVALID_ARGUMENT)
            placed.append((_path(path), offset, length, at))
            cursor = at + length
        out = ffi.new("tier0_ring **")
        with self._native.use() as handle:
            _check(lib.tier0_ring_new(handle, buffer._handle, len(placed), out))
        ring = ffi.gc(out[0], lib.tier0_ring_free)
        try:
            for index, (path, offset, length, at) in enumerate(placed):
                _check(lib.tier0_ring_prep_read(ring, path, offset, length, at, index))
            _check(lib.tier0_ring_submit(ring))
            completions = ffi.new("tier0_completion[]", len(placed))
            count = ffi.new("uint32_t *")
            _check(lib.tier0_ring_wait(ring, completions, len(placed), len(placed), count))
            results = {}
            for i in range(count[0]):
                completion = completions[i]
                results[completion.user_data] = (completion.result, completion.bytes)
            # The first failed read, with its own message.
            failed = next((index for index in range(len(placed)) if results[index][0] != lib.TIER0_OK), None)
            message = _ring_error(ring, failed) if failed is not None else None
        finally:
            ffi.release(ring)  # frees it now (waits for nothing: every read was reaped)
        if failed is not None:
            code = results[failed][0]
            path = reads[failed][0]
            _raise(code, f"{path}: {ffi.string(lib.tier0_strerror(code)).decode()} ({message})")
        return [buffer.array[at : at + results[index][1]] for index, (_, _, _, at) in enumerate(placed)]


def _ring_error(ring, user_data):
    """The message of the failed read tagged ``user_data``, reaped from ``ring``."""
    size = 1024
    length = ffi.new("size_t *")
    while True:
        text = ffi.new("char[]", size)
        code = lib.tier0_ring_error(ring, user_data, text, size, length)
        if code != lib.TIER0_OK:
            return ffi.string(lib.tier0_last_error()).decode("utf-8", "replace")
        if length[0] < size:
            return ffi.string(text).decode("utf-8", "replace")
        size = length[0] + 1
