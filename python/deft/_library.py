"""Finding and loading libdeft.so once per process.

Search order: $DEFT_LIBRARY (a file), then libdeft.so next to this package (an installed copy),
then build/libdeft.so of the source tree this package sits in (python/deft -> ../../build).
"""
from __future__ import annotations

import os
import threading
from typing import Optional

from ._capi import DeftLibrary

_lock = threading.Lock()
_lib: Optional[DeftLibrary] = None


def _candidates():
    env = os.environ.get("DEFT_LIBRARY")
    if env:
        yield env
    here = os.path.dirname(os.path.abspath(__file__))
    yield os.path.join(here, "libdeft.so")
    yield os.path.join(here, "..", "..", "build", "libdeft.so")


def library() -> DeftLibrary:
    """The loaded library; raises RuntimeError saying where it looked if there is none."""
    global _lib
    with _lock:
        if _lib is None:
            tried = []
            for path in _candidates():
                path = os.path.abspath(path)
                tried.append(path)
                if os.path.isfile(path):
                    _lib = DeftLibrary(path)
                    break
            if _lib is None:
                raise RuntimeError(
                    "deft: cannot find libdeft.so (looked in: " + ", ".join(tried) + "). Build it "
                    "with `cmake -S . -B build -G Ninja && cmake --build build` in the deft "
                    "source tree, or set DEFT_LIBRARY to its path.")
        return _lib
