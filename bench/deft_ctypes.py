"""The benchmark's handle on deft's C API: python/deft/_capi.py, loaded by path so that the
benchmark needs neither an installed package nor torch at import time."""
import importlib.util
import os
import sys

_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "deft", "_capi.py")
_spec = importlib.util.spec_from_file_location("deft_capi", _path)
_mod = importlib.util.module_from_spec(_spec)
sys.modules["deft_capi"] = _mod
_spec.loader.exec_module(_mod)

DeftLibrary = _mod.DeftLibrary
DeftKernel = _mod.DeftKernel
