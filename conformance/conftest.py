"""The conformance suite's one fixture: ``backend``, parametrized over the registered backends.

Registered: ``numpy`` (the spec itself, always), ``torch`` and ``jax`` (when the framework is installed).
A third party names its own module instead, one that exports the dpkd API and
``DPKD_FRAMEWORK = "numpy" | "torch" | "jax"``::

    pytest conformance/ --dpkd-backend=my.module        # or: DPKD_BACKEND=my.module pytest conformance/

Hypothesis profiles: ``ci`` (chosen when the environment variable CI is set: few examples, derandomized,
no deadline) and ``dev`` (more examples); ``HYPOTHESIS_PROFILE`` overrides.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
from dpkd.conformance.adapters import BackendAdapter, JaxAdapter, NumpyAdapter, TorchAdapter, adapter_for_module
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=4, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "dev", max_examples=30, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# The default is the derandomized "ci" profile: the suite gives the same verdict on every run, and its time
# fits CI. HYPOTHESIS_PROFILE=dev draws 30 fresh examples per property (a random search; run it locally).
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
    loaded = _LOADED[request.param]
    if isinstance(loaded, str):
        pytest.skip(loaded)
    return loaded
