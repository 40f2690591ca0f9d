"""The docstring examples of dpkd.backends.jax run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["logps", "sequence", "token", "distill", "metrics", "objective", "transforms"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"dpkd.backends.jax.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
