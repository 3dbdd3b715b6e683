"""A real cluster for the session: `tier0 cluster up` (3 data daemons and a control plane on
loopback), torn down with `tier0 cluster down --purge` at the end. The binary is TIER0_BIN,
or the newest target/{debug,release}/tier0 of the repository (`cargo build` or `cargo test`
makes it)."""

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tier0_binary():
    named = os.environ.get("TIER0_BIN")
    if named:
        return named
    built = [REPO / "target" / profile / "tier0" for profile in ("debug", "release")]
    built = [path for path in built if path.is_file()]
    if not built:
        pytest.exit("target/debug/tier0 not found: run `cargo build -p tier0` first", returncode=2)
    return str(max(built, key=lambda path: path.stat().st_mtime))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    binary = tier0_binary()
    folder = tmp_path_factory.mktemp("cluster") / "c"
    saved = {key: os.environ.get(key) for key in ("TIER0_CONTROL", "TIER0_TOKEN")}
    try:
        # Inside the try: a `cluster up` that fails or times out half-way may have started
        # daemons, which `cluster down --purge` below stops.
        up = subprocess.run(
            [binary, "cluster", "up", "--nodes", "3", "--dir", str(folder), "--store-size", "128MiB", "--chunk-size", "256KiB"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert up.returncode == 0, f"cluster up failed: {up.stderr}"
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, re.MULTILINE))
        os.environ.update(exports)
        yield exports
    finally:
        # Connected clients hold the daemons' connections open, which slows their exit
        # (SIGTERM, then SIGKILL after 10 s).
        import tier0.client

        for open_client in list(tier0.client._OPEN):
            open_client.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        down = subprocess.run([binary, "cluster", "down", "--dir", str(folder), "--purge"], capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, f"cluster down --purge failed ({down.returncode}): {down.stderr}"


@pytest.fixture(scope="session")
def client(cluster):
    import tier0

    with tier0.Client(cluster["TIER0_CONTROL"], cluster["TIER0_TOKEN"]) as client:
        yield client


@pytest.fixture
def folder(client):
    """A fresh directory of the namespace for one test, removed after it."""
    path = f"/py-{uuid.uuid4().hex[:12]}"
    client.mkdir(path)
    yield path
    try:
        client.remove(path, recursive=True)
    except Exception:
        pass
