"""The package top: what a cluster job imports, resolved lazily (``import sparserm`` pulls neither torch nor Ray)."""
import importlib
import subprocess
import sys

import pytest

import sparserm


def test_every_export_is_the_object_of_its_module():
    for name, module in sparserm._EXPORTS.items():
        assert getattr(sparserm, name) is getattr(importlib.import_module(module), name), name
    assert sorted(dir(sparserm)) == sorted(sparserm.__all__) and "SparseRM" in sparserm.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sparserm.nope  # noqa: B018


def test_import_is_light():
    code = "import sys, sparserm; print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

