"""The conformance suite's one fixture: ``backend``, parametrized over the registered backends.

Registered: ``numpy`` (the spec itself, always), ``torch`` and ``jax`` (when the framework is installed).
A third party names its own module instead, one that exports the dpkd API and
``DPKD_FRAMEWORK = "numpy" | "torch" | "jax"``::

    pytest conformance/ --dpkd-backend=my.module        # or: DPKD_BACKEND=my.module pytest conformance/

A function the backend does not export FAILS every test of it (and ``test_api_surface.py``). A partial
backend is an explicit opt-in: ``--dpkd-allow-missing=name,...`` skips those functions instead, and the
summary at the end lists what was not run.

Hypothesis profiles: ``ci``, the default (4 examples per property, derandomized: the same verdict on every
run, no deadline), and ``dev`` (30 fresh examples per property: a random search); the environment variable
``HYPOTHESIS_PROFILE`` chooses.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import pytest
from dpkd.conformance.adapters import BackendAdapter, JaxAdapter, NumpyAdapter, TorchAdapter, adapter_for_module
from dpkd.conformance.testing import NOT_RUN
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=4, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "dev", max_examples=30, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# name -> (framework to import, backend module, adapter class)
BUILTIN = {
    "numpy": ("numpy", "dpkd.spec", NumpyAdapter),
    "torch": ("torch", "dpkd.backends.torch", TorchAdapter),
    "jax": ("jax", "dpkd.backends.jax", JaxAdapter),
}
_LOADED: dict[str, BackendAdapter | str] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--dpkd-backend", action="append", default=None, metavar="MODULE",
        help="run the conformance suite on this backend module (repeatable; env DPKD_BACKEND, comma-separated)",
    )
    parser.addoption(
        "--dpkd-allow-missing", action="append", default=None, metavar="NAME,...",
        help="accept a partial backend: skip these functions instead of failing (repeatable, comma-separated); "
             "the summary lists them",
    )


def _allowed_missing(config: pytest.Config) -> frozenset[str]:
    return frozenset(n.strip() for arg in config.getoption("--dpkd-allow-missing") or () for n in arg.split(",")
                     if n.strip())


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for backend, names in sorted(NOT_RUN.items()):
        terminalreporter.write_line(f"not run (allowed by --dpkd-allow-missing): {backend}: {', '.join(sorted(names))}")


def _backend_names(config: pytest.Config) -> list[str]:
    names = config.getoption("--dpkd-backend") or []
    if not names and os.environ.get("DPKD_BACKEND"):
        names = [n.strip() for n in os.environ["DPKD_BACKEND"].split(",") if n.strip()]
    return names or list(BUILTIN)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _backend_names(metafunc.config), indirect=True, scope="session")


def _load(name: str) -> BackendAdapter | str:
    """The adapter, or the reason it cannot run here."""
    if name not in BUILTIN:
        return adapter_for_module(name)
    framework, module, adapter = BUILTIN[name]
    if importlib.util.find_spec(framework) is None:
        return f"backend {name}: {framework} is not installed"
    try:
        return adapter()
    except ModuleNotFoundError as exc:  # the backend package itself is not written/installed yet
        if exc.name and module.startswith(exc.name):
            return f"backend {name}: {module} is not importable ({exc})"
        raise


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> BackendAdapter:
    if request.param not in _LOADED:
        _LOADED[request.param] = _load(request.param)
        if not isinstance(_LOADED[request.param], str):
            _LOADED[request.param].allow_missing = _allowed_missing(request.config)
    loaded = _LOADED[request.param]
    if isinstance(loaded, str):
        pytest.skip(loaded)
    return loaded
