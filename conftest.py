"""Settings of every test run, the doctests of the packages included."""

import os

# Doctests of a compiled hot-path module (see stream.native) are collected from the module
# the process imports, whose file is the compiled build, not the .py pytest collects; pytest
# calls that an import mismatch unless told to accept it. (Test files keep distinct names:
# tests/unit/test_native.py checks it, since this would hide a clash between two of them.)
os.environ.setdefault("PY_IGNORE_IMPORTMISMATCH", "1")
