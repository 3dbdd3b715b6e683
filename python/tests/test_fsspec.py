"""tier0:// through fsspec, pandas and pyarrow against a real cluster."""

import io

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


@pytest.fixture
def fs(cluster):
    return fsspec.filesystem("tier0")


def test_registered_for_the_protocol(fs):
    assert type(fs).__name__ == "Tier0FileSystem"
    assert fsspec.get_filesystem_class("tier0") is type(fs)
    assert fs._strip_protocol("tier0:///a/b/") == "/a/b"
    assert fs._strip_protocol("tier0://a/b") == "/a/b"


def test_files_and_directories(fs, folder):
    fs.mkdir(f"tier0://{folder}/sub/deeper", create_parents=True)
    with fs.open(f"tier0://{folder}/sub/hello.txt", "wb") as f:
        f.write(b"hello ")
        f.write(b"world")
        # Nothing is visible before close.
        assert not fs.exists(f"{folder}/sub/hello.txt")
    assert fs.cat_file(f"tier0://{folder}/sub/hello.txt") == b"hello world"
    assert fs.cat_file(f"{folder}/sub/hello.txt", start=6) == b"world"
    assert fs.cat_file(f"{folder}/sub/hello.txt", start=-5, end=-1) == b"worl"
    info = fs.info(f"tier0://{folder}/sub/hello.txt")
    assert info["type"] == "file" and info["size"] == 11
    assert sorted(fs.ls(f"{folder}/sub", detail=False)) == [f"{folder}/sub/deeper", f"{folder}/sub/hello.txt"]
    with fs.open(f"{folder}/sub/hello.txt", "rb") as f:
        f.seek(6)
        assert f.read(3) == b"wor"
    # Large enough to flush several blocks before close: still one commit.
    big = np.random.default_rng(1).integers(0, 256, 12 << 20, dtype=np.uint8).tobytes()
    with fs.open(f"{folder}/big", "wb", block_size=5 << 20) as f:
        for at in range(0, len(big), 1 << 20):
            f.write(big[at : at + (1 << 20)])
    assert fs.cat_file(f"{folder}/big") == big
    fs.pipe_file(f"{folder}/piped", b"piped")
    assert fs.cat_file(f"{folder}/piped") == b"piped"
    fs.rm(f"tier0://{folder}/piped")
    assert not fs.exists(f"{folder}/piped")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{folder}/piped")
    with pytest.raises(FileNotFoundError):
        fs.open(f"{folder}/piped", "rb")
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{folder}/sub")
    fs.makedirs(f"{folder}/sub", exist_ok=True)
    fs.rm(f"{folder}/sub", recursive=True)
    assert not fs.exists(f"{folder}/sub")


def test_write_into_missing_directory_commits_nothing(fs, folder):
    with pytest.raises(FileNotFoundError):
        with fs.open(f"{folder}/missing/f", "wb") as f:
            f.write(b"data")
    assert not fs.exists(f"{folder}/missing/f")


def test_failed_write_block_commits_nothing(fs, folder):
    fs.pipe_file(f"{folder}/kept", b"old version")
    with pytest.raises(RuntimeError, match="boom"):
        with fs.open(f"{folder}/kept", "wb", block_size=5 << 20) as f:
            f.write(b"x" * (6 << 20))  # more than a block: flushed before the failure
            raise RuntimeError("boom")
    assert fs.cat_file(f"{folder}/kept") == b"old version"
    with pytest.raises(RuntimeError, match="boom"):
        with fs.open(f"{folder}/new", "wb") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not fs.exists(f"{folder}/new")


def test_open_for_reading_is_pinned(cluster, fs, folder):
    import tier0

    old = np.random.default_rng(3).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    fs.pipe_file(f"{folder}/p", old)
    with fs.open(f"{folder}/p", "rb", block_size=1 << 20, cache_type="none") as f:
        head = f.read(1 << 20)
        with tier0.Client(cluster["TIER0_CONTROL"], cluster["TIER0_TOKEN"]) as writer:
            writer.write(f"{folder}/p", b"new, shorter")
        assert f.size == len(old)
        assert head + f.read() == old
    assert fs.cat_file(f"{folder}/p") == b"new, shorter"


def test_pandas_csv(fs, folder):
    frame = pd.DataFrame({"id": np.arange(5000), "value": np.linspace(0, 1, 5000), "name": [f"row{i}" for i in range(5000)]})
    frame.to_csv(f"tier0://{folder}/table.csv", index=False)
    back = pd.read_csv(f"tier0://{folder}/table.csv")
    pd.testing.assert_frame_equal(back, frame)


def test_pyarrow_parquet(fs, folder, monkeypatch):
    table = pa.table({"x": np.arange(200_000, dtype=np.int64), "y": np.random.default_rng(2).random(200_000)})
    with fs.open(f"{folder}/t.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=50_000)
    back = pq.read_table(f"{folder}/t.parquet", filesystem=fs)
    assert back.equals(table)
    # Column projection reads ranges, not the whole file: with small blocks and no cache,
    # the bytes fetched are well under the file's size (x's column chunks are skipped).
    from tier0.fs import Tier0File

    fetched = []
    fetch = Tier0File._fetch_range

    def counting(self, start, end):
        fetched.append(end - start)
        return fetch(self, start, end)

    size = fs.info(f"{folder}/t.parquet")["size"]
    monkeypatch.setattr(Tier0File, "_fetch_range", counting)
    with fs.open(f"{folder}/t.parquet", "rb", block_size=64 << 10, cache_type="none") as f:
        only_y = pq.read_table(f, columns=["y"])
    monkeypatch.undo()
    assert only_y.column("y").equals(table.column("y"))
    assert 0 < sum(fetched) < 0.75 * size, (sum(fetched), size)
    # And a file object from fsspec.open.
    with fsspec.open(f"tier0://{folder}/t.parquet", "rb") as f:
        assert pq.read_table(io.BytesIO(f.read())).equals(table)
