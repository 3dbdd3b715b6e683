"""Hugging Face ``datasets`` loading Parquet, JSON-lines and CSV files from tier0:// URLs
through the fsspec file system, with every cache in a temporary directory and no network
but loopback.

``datasets``' offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) refuses to download any
URL that is not a local path, tier0:// included (``fsspec_head``/``fsspec_get`` raise
OfflineModeIsEnabled), so the downloading path runs with it off and Python's sockets held
to loopback; streaming, which reads through fsspec without downloading, runs with it on."""

import json
import socket

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

datasets = pytest.importorskip("datasets")


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """Caches under tmp_path (nothing in the home directory), and no connection from Python
    to anything but loopback (tier0's own connections are the Rust library's)."""
    import huggingface_hub.constants

    home = tmp_path / "hf"
    paths = {
        "HF_CACHE_HOME": home,
        "HF_DATASETS_CACHE": home / "datasets",
        "DOWNLOADED_DATASETS_PATH": home / "datasets" / "downloads",
        "EXTRACTED_DATASETS_PATH": home / "datasets" / "downloads" / "extracted",
        "HF_MODULES_CACHE": home / "modules",
    }
    for name, path in paths.items():
        monkeypatch.setattr(datasets.config, name, path)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(home / "modules"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False, raising=False)

    connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test_datasets: no network: connect to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)

    def offline(on):
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", on)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", on, raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", on)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if on else "0")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1" if on else "0")

    offline(False)
    yield {"cache_dir": str(home / "datasets"), "offline": offline}
    assert home.is_dir()


def write_files(fs, folder):
    """A Parquet file of 1000 rows (4 row groups), 2 JSON-lines files and a CSV file."""
    fs.mkdir(f"tier0://{folder}/data")
    ids = np.arange(1000, dtype=np.int64)
    table = pa.table({"id": ids, "score": ids * 0.5, "name": [f"row{i}" for i in ids]})
    with fs.open(f"tier0://{folder}/data/train.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=250)
    for part in range(2):
        lines = (json.dumps({"id": i, "text": f"line {i}"}) + "\n" for i in range(part * 10, part * 10 + 10))
        fs.pipe_file(f"tier0://{folder}/data/rows-{part}.jsonl", "".join(lines).encode())
    fs.pipe_file(f"tier0://{folder}/data/small.csv", b"a,b\n1,x\n2,y\n3,z\n")
    return table


def test_load_dataset_parquet_json_csv(cluster, folder, hf):
    fs = fsspec.filesystem("tier0")
    table = write_files(fs, folder)
    cache = hf["cache_dir"]

    parquet = datasets.load_dataset("parquet", data_files=f"tier0://{folder}/data/train.parquet", split="train", cache_dir=cache)
    assert parquet.num_rows == 1000
    assert parquet.column_names == ["id", "score", "name"]
    assert parquet[0] == {"id": 0, "score": 0.0, "name": "row0"}
    assert parquet[999] == {"id": 999, "score": 499.5, "name": "row999"}
    assert parquet.data.table.equals(table)

    # Splits, a glob, and the cluster named in storage_options rather than the environment.
    options = {"control": cluster["TIER0_CONTROL"], "token": cluster["TIER0_TOKEN"]}
    jsonl = datasets.load_dataset(
        "json",
        data_files={"train": f"tier0://{folder}/data/rows-*.jsonl", "test": f"tier0://{folder}/data/rows-1.jsonl"},
        storage_options=options,
        cache_dir=cache,
    )
    assert jsonl["train"].num_rows == 20 and jsonl["test"].num_rows == 10
    assert sorted(jsonl["train"]["id"]) == list(range(20))
    assert jsonl["test"][0] == {"id": 10, "text": "line 10"}

    csv = datasets.load_dataset("csv", data_files=f"tier0://{folder}/data/small.csv", split="train", cache_dir=cache)
    assert csv.to_dict() == {"a": [1, 2, 3], "b": ["x", "y", "z"]}

    # A rewrite changes the file's ETag (id and version), so the data files' fingerprint
    # changes; datasets keys its downloads of data files by URL alone (use_etag=False), so a
    # new copy needs force_redownload.
    before = datasets.data_files.DataFilesList.from_patterns([f"tier0://{folder}/data/small.csv"]).origin_metadata
    fs.pipe_file(f"tier0://{folder}/data/small.csv", b"a,b\n4,w\n")
    after = datasets.data_files.DataFilesList.from_patterns([f"tier0://{folder}/data/small.csv"]).origin_metadata
    assert before != after
    again = datasets.load_dataset("csv", data_files=f"tier0://{folder}/data/small.csv", split="train", cache_dir=cache, download_mode="force_redownload")
    assert again.to_dict() == {"a": [4], "b": ["w"]}


def test_streaming_offline(cluster, folder, hf):
    fs = fsspec.filesystem("tier0")
    table = write_files(fs, folder)
    hf["offline"](True)

    parquet = datasets.load_dataset("parquet", data_files=f"tier0://{folder}/data/train.parquet", split="train", streaming=True)
    rows = list(parquet)
    assert len(rows) == 1000
    assert rows[123] == {"id": 123, "score": 61.5, "name": "row123"}
    assert [row["id"] for row in rows] == table.column("id").to_pylist()

    jsonl = datasets.load_dataset("json", data_files=f"tier0://{folder}/data/rows-*.jsonl", split="train", streaming=True)
    assert sorted(row["id"] for row in jsonl) == list(range(20))
    # Streaming reads the file each time it is iterated: a rewrite shows.
    csv = datasets.load_dataset("csv", data_files=f"tier0://{folder}/data/small.csv", split="train", streaming=True)
    assert list(csv) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}, {"a": 3, "b": "z"}]
    fs.pipe_file(f"tier0://{folder}/data/small.csv", b"a,b\n4,w\n")
    assert list(csv) == [{"a": 4, "b": "w"}]

    # Downloading is what offline mode refuses, for any URL that is not a local path.
    with pytest.raises(ConnectionError, match="Offline mode"):
        datasets.load_dataset("csv", data_files=f"tier0://{folder}/data/small.csv", split="train", cache_dir=hf["cache_dir"])
