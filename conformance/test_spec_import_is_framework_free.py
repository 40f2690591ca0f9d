"""``import dpkd.spec`` (and its registry) imports neither torch nor jax: checked in a fresh interpreter."""

import subprocess
import sys

CODE = (
    "import sys, dpkd.spec, dpkd.spec.registry\n"
    "loaded = sorted(m for m in ('torch', 'jax', 'jaxlib') if m in sys.modules)\n"
    "assert not loaded, loaded\n"
)


def test_import_dpkd_spec_loads_no_framework():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
