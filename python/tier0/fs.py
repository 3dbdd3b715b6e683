"""An fsspec file system for ``tier0://`` URLs: pandas, pyarrow and Hugging Face datasets
read (and write) tier0 files through it.

``tier0:///datasets/x.csv`` and ``tier0://datasets/x.csv`` both name ``/datasets/x.csv``.
The cluster comes from ``control=`` and ``token=`` (storage options) or ``TIER0_CONTROL``
and ``TIER0_TOKEN``. A file opened for reading is pinned to the version current at open
(:meth:`tier0.Client.open`): its size and every range it fetches are that version's, even if
another writer commits meanwhile. A file opened for writing streams to the daemons and is committed
whole at close (readers see the old version or the new one, never a part); a ``with`` block
that raises discards it instead, committing nothing.
"""

from datetime import datetime, timezone

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from .client import Client, NotFound


class Tier0FileSystem(AbstractFileSystem):
    protocol = "tier0"
    root_marker = "/"

    def __init__(self, control=None, token=None, **kwargs):
        super().__init__(**kwargs)
        self.client = Client(control, token)

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, (list, tuple)):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("tier0://"):
            path = path[len("tier0://") :]
        path = "/" + path.lstrip("/")
        return path.rstrip("/") or "/"

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        info = self.info(path)
        entries = [_fsspec_info(entry) for entry in self.client.ls(path)] if info["type"] == "directory" else [info]
        return entries if detail else [entry["name"] for entry in entries]

    def info(self, path, **kwargs):
        return _fsspec_info(self.client.stat(self._strip_protocol(path)))

    def ukey(self, path):
        """Changes whenever the file does: its id and version (see ``ETag`` in :meth:`info`)."""
        info = self.info(path)
        return info.get("ETag") or f"{info['id']}-{info['modified_ms']}"

    def modified(self, path):
        return datetime.fromtimestamp(self.info(path)["modified_ms"] / 1000, tz=timezone.utc)

    def created(self, path):
        return datetime.fromtimestamp(self.info(path)["created_ms"] / 1000, tz=timezone.utc)

    def exists(self, path, **kwargs):
        try:
            self.info(path)
            return True
        except NotFound:
            return False

    def cat_file(self, path, start=None, end=None, **kwargs):
        # One open per call: the version current now (not the client's cached layout), all
        # bytes from it.
        path = self._strip_protocol(path)
        with self.client.open(path) as file:
            size = file.size
            start = 0 if start is None else (start + size if start < 0 else start)
            end = size if end is None else (end + size if end < 0 else end)
            start = min(max(start, 0), size)
            end = min(max(end, start), size)
            return file.read_at(start, end - start)

    def pipe_file(self, path, value, **kwargs):
        self.client.write(self._strip_protocol(path), value)

    def mkdir(self, path, create_parents=True, **kwargs):
        self.client.mkdir(self._strip_protocol(path), parents=create_parents)

    def makedirs(self, path, exist_ok=False):
        path = self._strip_protocol(path)
        if not exist_ok and self.exists(path):
            raise FileExistsError(path)
        self.client.mkdir(path, parents=True)

    def rm(self, path, recursive=False, maxdepth=None):
        for one in path if isinstance(path, (list, tuple)) else [path]:
            self.client.remove(self._strip_protocol(one), recursive=recursive)

    def _rm(self, path):
        self.client.remove(self._strip_protocol(path))

    def rmdir(self, path):
        self.client.remove(self._strip_protocol(path))

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        return Tier0File(self, self._strip_protocol(path), mode, block_size or "default", autocommit, cache_options=cache_options, **kwargs)


def _fsspec_info(stat):
    """A :meth:`tier0.Client.stat` dict with what fsspec users look for added: ``mtime`` (seconds
    since the epoch, as the local file system gives it) and, for files, ``ETag``: the entry's
    id and version, which change with every commit and never come back (an id is never reused),
    so what keys a cache on it (Hugging Face datasets' data-file fingerprints, fsspec's
    ``ukey``) sees a rewrite."""
    stat["mtime"] = stat["modified_ms"] / 1000
    if stat["type"] == "file":
        stat["ETag"] = f"{stat['id']}-{stat['version']}"
    return stat


class Tier0File(AbstractBufferedFile):
    """A file on tier0: reads fetch ranges of the version opened; writes stream to the data
    daemons block by block and are committed whole at close (discarded when a ``with``
    block raises)."""

    def __init__(self, fs, path, mode="rb", block_size="default", autocommit=True, cache_options=None, **kwargs):
        self._file = None
        if mode == "rb":
            self._file = fs.client.open(path)
            kwargs["size"] = self._file.size
        try:
            super().__init__(fs, path, mode, block_size, autocommit, cache_options=cache_options, **kwargs)
        except BaseException:
            if self._file is not None:
                self._file.close()
            raise

    def _fetch_range(self, start, end):
        return self._file.read_at(start, end - start)

    def close(self):
        try:
            super().close()
        finally:
            if getattr(self, "_file", None) is not None:
                self._file.close()

    def discard(self):
        """Throws away what was written: nothing is committed, and the file is closed."""
        if self.closed:
            return
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.discard()
            self._writer = None
        self.buffer = None
        self.closed = True

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None and self.writable():
            self.discard()
        else:
            self.close()

    def _initiate_upload(self):
        # Streamed to the daemons block by block; committed only by the final chunk.
        self._writer = self.fs.client.create(self.path)

    def _upload_chunk(self, final=False):
        if getattr(self, "_writer", None) is None:
            # A file closed without ever filling a block: fsspec uploads it all here.
            self._initiate_upload()
        self._writer.write(self.buffer.getbuffer())
        if final:
            writer, self._writer = self._writer, None
            writer.commit()
        return True
