"""Loads libtier0 (the C ABI) with cffi, declared from its own header (ffi/c/include/tier0.h).

The library is, in this order: the file ``TIER0_LIB`` names; ``libtier0.so`` next to this
package; or the newest ``libtier0.so`` a cargo build left in the repository's
``target/{release,debug}`` (or their ``deps/``). The header is ``TIER0_HEADER``, or
``tier0.h`` next to the library, in ``../include`` of it (an installed prefix), next to this
package, or the repository's ``ffi/c/include/tier0.h``.
"""

import os
import re
from pathlib import Path

import cffi

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent.parent


def _library_path():
    named = os.environ.get("TIER0_LIB")
    if named:
        if not Path(named).is_file():
            raise ImportError(f"TIER0_LIB={named}: no such file")
        return Path(named)
    beside = _HERE / "libtier0.so"
    if beside.is_file():
        return beside
    built = [
        _REPO / "target" / profile / sub / "libtier0.so"
        for profile in ("release", "debug")
        for sub in (".", "deps")
    ]
    built = [path for path in built if path.is_file()]
    if not built:
        raise ImportError(
            "libtier0.so not found: build it with `cargo build -p tier0-c` in the repository, "
            "or set TIER0_LIB to its path"
        )
    return max(built, key=lambda path: path.stat().st_mtime)


def _header_path(library):
    named = os.environ.get("TIER0_HEADER")
    candidates = [Path(named)] if named else []
    candidates += [
        library.parent / "tier0.h",
        library.parent.parent / "include" / "tier0.h",
        _HERE / "tier0.h",
        _REPO / "ffi" / "c" / "include" / "tier0.h",
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise ImportError("tier0.h not found (set TIER0_HEADER to its path)")


def _declarations(header):
    """The header as cffi's cdef takes it: no preprocessor lines, no extern "C" block."""
    lines = []
    for line in header.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or re.match(r'^(extern "C" \{|\}\s*// extern "C")', stripped):
            continue
        lines.append(line)
    return "\n".join(lines)


LIBRARY_PATH = _library_path()
HEADER_PATH = _header_path(LIBRARY_PATH)
ffi = cffi.FFI()
ffi.cdef(_declarations(HEADER_PATH))
lib = ffi.dlopen(str(LIBRARY_PATH))
