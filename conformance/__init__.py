"""dpkd.conformance — the conformance suite's harness, for third-party backends and their own tests.

* :mod:`dpkd.conformance.adapters` — the only framework-specific code the suite needs: an adapter turns
  NumPy inputs into a backend's arrays, calls the backend's function and returns values and gradients as
  float64 NumPy (``adapter_for_module("my.backend")``).
* :mod:`dpkd.conformance.testing` — the one tolerance table, ``assert_close``, Hypothesis strategies over
  the registry's cases (``calls(spec, variant)``) and ``require`` (a missing function fails, unless the
  run allows it with ``--dpkd-allow-missing``).

The suite itself is the ``test_*.py`` files beside this package's modules: run it from a checkout with
``pytest conformance/ --dpkd-backend=my.module`` (README "Conformance for your own backend"). Importing
this package imports neither torch nor jax.
"""

from . import adapters, testing

__all__ = ["adapters", "testing"]
