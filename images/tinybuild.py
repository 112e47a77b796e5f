"""images/build as a module, for the other tools of the pipeline (build-installer,
build-from-iso): one copy of the package, initramfs and boot-partition code.

images/build stays a script with no .py suffix (its name is its command); this loads it.
"""
from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

BUILD = Path(__file__).resolve().parent / "build"


def load() -> ModuleType:
    if "tinybuild_script" in sys.modules:
        return sys.modules["tinybuild_script"]
    loader = SourceFileLoader("tinybuild_script", str(BUILD))
    spec = importlib.util.spec_from_loader("tinybuild_script", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tinybuild_script"] = mod
    loader.exec_module(mod)
    return mod
