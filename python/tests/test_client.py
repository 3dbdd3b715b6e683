"""The Python client against a real cluster: reads as bytes, into numpy arrays and zero-copy
batches into a registered buffer (every byte checked), writes, the namespace, and bad
arguments (clear exceptions, nothing written)."""

import numpy as np
import pytest

import tier0

CHUNK = 256 << 10


def pattern(size, seed):
    index = np.arange(size, dtype=np.uint64)
    return ((index * np.uint64(31) + np.uint64(seed * 7) + (index >> np.uint64(9))) & np.uint64(0xFF)).astype(np.uint8)


def test_write_then_read_bytes(client, folder):
    data = pattern(3 * CHUNK + 777, 1).tobytes()
    client.write(f"{folder}/a.bin", data)
    assert client.read(f"{folder}/a.bin") == data
    assert client.size(f"{folder}/a.bin") == len(data)
    assert client.read_range(f"{folder}/a.bin", CHUNK - 10, 20) == data[CHUNK - 10 : CHUNK + 10]
    assert client.read_range(f"{folder}/a.bin", len(data) - 5, 100) == data[-5:]
    client.write(f"{folder}/empty", b"")
    assert client.read(f"{folder}/empty") == b""
    # A new version replaces the old one whole.
    client.write(f"{folder}/a.bin", b"short")
    assert client.read(f"{folder}/a.bin") == b"short"


def test_read_into_numpy(client, folder):
    data = pattern(2 * CHUNK + 5, 2)
    client.write(f"{folder}/n.bin", data)
    out = np.zeros(len(data), dtype=np.uint8)
    assert client.read_into(f"{folder}/n.bin", out) == len(data)
    assert np.array_equal(out, data)
    # Other dtypes and a range.
    words = np.zeros(CHUNK // 4, dtype=np.uint32)
    assert client.read_into(f"{folder}/n.bin", words, offset=CHUNK // 2, length=CHUNK) == CHUNK
    assert words.tobytes() == data[CHUNK // 2 : CHUNK // 2 + CHUNK].tobytes()
    with pytest.raises(tier0.BufferTooSmall, match="do not fit"):
        client.read_into(f"{folder}/n.bin", np.zeros(10, dtype=np.uint8))
    with pytest.raises(tier0.InvalidArgument, match="writable"):
        client.read_into(f"{folder}/n.bin", bytes(len(data)))


def test_zero_copy_batch(client, folder):
    files = {f"{folder}/f{i}": pattern(CHUNK * (i + 1) + 100 * i, 10 + i) for i in range(4)}
    for path, data in files.items():
        client.write(path, data)
    buffer = tier0.Buffer(16 << 20)
    assert buffer.array.dtype == np.uint8 and len(buffer.array) == 16 << 20
    reads = [(path, 0, len(data)) for path, data in files.items()]
    reads += [(f"{folder}/f3", CHUNK - 3, CHUNK + 6), (f"{folder}/f2", 3 * CHUNK + 150, 1000)]
    views = client.read_batch(reads, buffer)
    for (path, offset, length), view in zip(reads, views):
        expected = files[path][offset : offset + length]
        assert np.array_equal(view, expected), path
    # Clipped at the end of f2 (3 * CHUNK + 200 bytes).
    assert len(views[-1]) == 50
    # The views are the buffer's own memory: no copy.
    for view in views:
        assert view.base is not None and np.shares_memory(view, buffer.array)
    address = buffer.array.__array_interface__["data"][0]
    assert address == buffer.address and address % 4096 == 0
    assert views[0].__array_interface__["data"][0] == address
    # Explicit buffer offsets.
    (view,) = client.read_batch([(f"{folder}/f0", 10, 100, 8192)], buffer)
    assert view.__array_interface__["data"][0] == address + 8192
    assert np.array_equal(view, files[f"{folder}/f0"][10:110])


def test_batch_errors(client, folder):
    client.write(f"{folder}/x", b"0123456789")
    buffer = tier0.Buffer(4096)
    with pytest.raises(tier0.NotFound, match="missing"):
        client.read_batch([(f"{folder}/x", 0, 10), (f"{folder}/missing", 0, 10)], buffer)
    # Each failed read is reported with its own cause, the failing one not last.
    with pytest.raises(tier0.NotFound) as first:
        client.read_batch([(f"{folder}/gone-a", 0, 10), (f"{folder}/x", 0, 10), (f"{folder}/gone-b", 0, 10)], buffer)
    assert "gone-a" in str(first.value) and "gone-b" not in str(first.value)
    with pytest.raises(tier0.InvalidArgument) as past:
        client.read_batch([(f"{folder}/x", 0, 10), (f"{folder}/x", 11, 1, 100), (f"{folder}/gone-c", 0, 10, 200)], buffer)
    assert "past the end" in str(past.value) and "gone-c" not in str(past.value)
    with pytest.raises(tier0.InvalidArgument, match="past the end"):
        client.read_batch([(f"{folder}/x", 11, 1)], buffer)
    with pytest.raises(tier0.BufferTooSmall, match="do not fit"):
        client.read_batch([(f"{folder}/x", 0, 10, 4090)], buffer)
    with pytest.raises(tier0.InvalidArgument, match="overlaps"):
        client.read_batch([(f"{folder}/x", 0, 10, 0), (f"{folder}/x", 0, 10, 5)], buffer)
    with pytest.raises(tier0.InvalidArgument):
        client.read_batch([(f"{folder}/x", 0)], buffer)
    with pytest.raises(tier0.InvalidArgument, match="tier0.Buffer"):
        client.read_batch([(f"{folder}/x", 0, 10)], bytearray(10))
    with pytest.raises(tier0.InvalidArgument):
        tier0.Buffer(0)
    with pytest.raises(tier0.InvalidArgument, match="NUMA node 4000"):
        tier0.Buffer(4096, numa_node=4000)
    assert client.read_batch([], buffer) == []


def test_namespace(client, folder):
    client.mkdir(f"{folder}/d/e", parents=True)
    client.write(f"{folder}/d/file", b"abc")
    entries = {entry["name"]: entry for entry in client.ls(f"{folder}/d")}
    assert entries[f"{folder}/d/e"]["type"] == "directory"
    assert entries[f"{folder}/d/file"]["type"] == "file" and entries[f"{folder}/d/file"]["size"] == 3
    assert client.stat(f"{folder}/d/file")["version"] >= 1
    with pytest.raises(tier0.AlreadyExists):
        client.mkdir(f"{folder}/d")
    with pytest.raises(tier0.Conflict, match="tier0_remove"):
        client.remove(f"{folder}/d")
    assert client.remove(f"{folder}/d", recursive=True) >= 3
    with pytest.raises(tier0.NotFound):
        client.stat(f"{folder}/d")


def test_bad_arguments(cluster, client, folder):
    with pytest.raises(tier0.NotFound) as missing:
        client.read(f"{folder}/nope")
    assert isinstance(missing.value, FileNotFoundError)
    assert f"{folder}/nope" in str(missing.value) and "tier0_file_size" in str(missing.value)
    assert missing.value.code == tier0.lib.TIER0_NOT_FOUND
    client.write(f"{folder}/r", b"x")
    with pytest.raises(tier0.InvalidArgument, match="past the end"):
        client.read_range(f"{folder}/r", 5, 1)
    with pytest.raises(tier0.InvalidArgument):
        client.read("relative/path")
    with pytest.raises(tier0.InvalidArgument, match="must be a str"):
        client.read(None)
    with pytest.raises(tier0.InvalidArgument):
        client.read_range(f"{folder}/r", -1, 1)
    # A write into a missing directory fails and leaves nothing.
    with pytest.raises(tier0.NotFound):
        client.write(f"{folder}/no-dir/f", b"data")
    with pytest.raises(tier0.NotFound):
        client.stat(f"{folder}/no-dir/f")
    with pytest.raises(tier0.AlreadyExists):
        client.write(folder, b"data")
    assert client.stat(folder)["type"] == "directory"
    # Connecting: a wrong token, a dead control plane, nothing configured.
    with pytest.raises(tier0.Unauthenticated, match="token"):
        tier0.Client(cluster["TIER0_CONTROL"], "wrong-token")
    with pytest.raises(tier0.Unavailable, match="127.0.0.1:1"):
        tier0.Client("http://127.0.0.1:1", cluster["TIER0_TOKEN"])
    with pytest.raises(tier0.InvalidArgument, match="TIER0_CONTROL"):
        tier0.Client("", "x")
    # A closed client refuses calls.
    other = tier0.Client(cluster["TIER0_CONTROL"], cluster["TIER0_TOKEN"])
    other.close()
    other.close()
    with pytest.raises(tier0.InvalidArgument, match="closed"):
        other.stat(folder)


def test_open_file_is_pinned_to_its_version(cluster, client, folder):
    path = f"{folder}/pinned.bin"
    old = pattern(3 * CHUNK + 123, 5).tobytes()
    client.write(path, old)
    with client.open(path) as f:
        assert f.size == len(old) and f.version >= 1
        head = f.read_at(0, CHUNK + 7)
        # Another client commits a new version, of another size, while the file is open.
        new = pattern(CHUNK + 9, 6).tobytes()
        with tier0.Client(cluster["TIER0_CONTROL"], cluster["TIER0_TOKEN"]) as writer:
            writer.write(path, new)
            assert writer.stat(path)["size"] == len(new)
        rest = f.read_at(CHUNK + 7, len(old))
        assert f.size == len(old)
        assert head + rest == old
        # readinto_at, into numpy, of the same version.
        out = np.zeros(100, dtype=np.uint8)
        assert f.readinto_at(len(old) - 50, out) == 50
        assert out[:50].tobytes() == old[-50:]
        with pytest.raises(tier0.InvalidArgument, match="past the end"):
            f.read_at(len(old) + 1, 1)
    with pytest.raises(tier0.InvalidArgument, match="closed"):
        f.read_at(0, 1)
    # Opened again: the new version.
    with client.open(path) as again:
        assert again.size == len(new) and again.read_at(0, len(new)) == new
    with pytest.raises(tier0.NotFound):
        client.open(f"{folder}/nope")


def test_close_waits_for_calls_in_flight(cluster, folder):
    """close() while other threads call: nothing is freed under a call; the calls finish
    (or, started after close, raise InvalidArgument)."""
    import threading

    other = tier0.Client(cluster["TIER0_CONTROL"], cluster["TIER0_TOKEN"])
    other.write(f"{folder}/c", b"x" * 1000)
    errors = []
    start = threading.Barrier(5)

    def reader():
        start.wait()
        for _ in range(50):
            try:
                assert other.read(f"{folder}/c") == b"x" * 1000
            except tier0.InvalidArgument as error:
                assert "closed" in str(error)
                return
            except Exception as error:  # noqa: BLE001
                errors.append(error)
                return

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    start.wait()
    other.close()
    for thread in threads:
        thread.join(30)
    assert not errors and other._native._raw is None


def test_streaming_writer_commits_at_the_end(client, folder):
    path = f"{folder}/streamed.bin"
    client.write(path, b"old version")
    data = np.random.default_rng(7).integers(0, 256, 300_001, dtype=np.uint8)
    with client.create(path) as writer:
        for start in range(0, data.size, 65_537):
            writer.write(data[start:start + 65_537])
        # Nothing is visible before the commit.
        assert client.read(path) == b"old version"
    assert client.read(path) == data.tobytes()
    # A writer left by an exception, or discarded, commits nothing.
    with pytest.raises(RuntimeError):
        with client.create(path) as writer:
            writer.write(b"partial")
            raise RuntimeError("interrupted")
    discarded = client.create(path)
    discarded.write(b"also partial")
    discarded.discard()
    assert client.read(path) == data.tobytes()
    with pytest.raises(tier0.NotFound):
        client.create(f"{folder}/no/such/dir/file")
    with pytest.raises(tier0.InvalidArgument):
        discarded.write(b"after discard")
