"""tier0: the Python client of a tier0 cluster, over libtier0 (the C ABI).

    import tier0, numpy as np
    client = tier0.Client()                     # TIER0_CONTROL, TIER0_TOKEN
    data = client.read("/datasets/part-0000")   # bytes
    buf = tier0.Buffer(64 << 20)                # registered memory; buf.array is a numpy view
    views = client.read_batch([("/a", 0, 4096), ("/b", 1 << 20, 1 << 20)], buf)  # no copy
    with client.open("/datasets/part-0000") as f:  # pinned to the version opened
        head = f.read_at(0, 4096)

and ``tier0://`` URLs in fsspec, pandas and pyarrow (``tier0.fs.Tier0FileSystem``).
"""

from ._native import HEADER_PATH, LIBRARY_PATH, ffi, lib
from .client import (
    AlreadyExists,
    Buffer,
    BufferTooSmall,
    Client,
    Conflict,
    Error,
    File,
    Writer,
    InternalError,
    InvalidArgument,
    IoError,
    NotFound,
    OutOfMemory,
    RingFull,
    Stale,
    Unauthenticated,
    Unavailable,
)

__version__ = ffi.string(lib.tier0_version()).decode()

__all__ = [
    "AlreadyExists",
    "Buffer",
    "BufferTooSmall",
    "Client",
    "Conflict",
    "Error",
    "File",
    "Writer",
    "HEADER_PATH",
    "InternalError",
    "InvalidArgument",
    "IoError",
    "LIBRARY_PATH",
    "NotFound",
    "OutOfMemory",
    "RingFull",
    "Stale",
    "Unauthenticated",
    "Unavailable",
]

try:
    import fsspec as _fsspec
except ImportError:  # fsspec is optional
    pass
else:
    _fsspec.register_implementation("tier0", "tier0.fs.Tier0FileSystem", clobber=True)
