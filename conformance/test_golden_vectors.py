"""Golden vectors: float64 inputs, outputs and spec gradients of every registered (function, variant),
generated from the spec by ``scripts/generate_golden.py`` and checked in. Every backend — the spec itself
included, so that a silent change of the spec is caught — is re-checked against the file."""

import json
from pathlib import Path

import numpy as np
import pytest
from dpkd.conformance import testing as t
from dpkd.spec import registry

GOLDEN = Path(__file__).parent / "golden" / "golden_vectors.json"
ENTRIES = json.loads(GOLDEN.read_text())["entries"]


def _decode(x):
    if isinstance(x, dict) and "__array__" in x:
        return np.asarray(x["__array__"], dtype=x["dtype"]).reshape(x["shape"])
    if isinstance(x, dict) and "__preset__" in x:
        return registry.objective_config(x["__preset__"])
    if isinstance(x, dict):
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


def _call(entry):
    return registry.Call(entry["function"], tuple(_decode(a) for a in entry["args"]),
                         {k: _decode(v) for k, v in entry["kwargs"].items()}, entry["variant"])


def test_golden_file_covers_every_registered_variant():
    have = {(e["function"], e["variant"]) for e in ENTRIES}
    want = {(s.name, v.name) for s in registry.REGISTRY for v in s.variants}
    assert want <= have, f"regenerate with `python scripts/generate_golden.py`: missing {sorted(want - have)}"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_backend_reproduces_golden_values(backend, entry):
    t.require(backend, entry["function"])
    call = _call(entry)
    out, _ = t.run_backend(backend, call, "float64")
    expected = _decode(entry["output"])
    actual = dict(t._fields(out))
    assert sorted(actual) == sorted(expected), f"output fields {sorted(actual)} != golden {sorted(expected)}"
    for name, e in expected.items():
        e = np.asarray(e)
        if e.dtype.kind in "iub":
            np.testing.assert_array_equal(np.asarray(actual[name]), e, err_msg=str(call))
        else:
            t.assert_close(actual[name], e, dtype="float64", quantity="values", call=call, backend=backend.name,
                           what=f"golden {entry['id']} {name}")


GRAD_ENTRIES = [e for e in ENTRIES if e.get("gradients")]


@pytest.mark.parametrize("entry", GRAD_ENTRIES, ids=[e["id"] for e in GRAD_ENTRIES])
def test_backend_reproduces_golden_gradients(backend, entry):
    t.require(backend, entry["function"])
    spec = registry.get(entry["function"])
    if t.is_reference(backend):
        t.require(backend, spec.gradient)
    call = _call(entry)
    wrt = registry.differentiable_positions(spec, call)
    _, grads = backend.value_and_grad(spec.name, call.args, dict(call.kwargs), wrt, "float64")
    expected = _decode(entry["gradients"])
    for i, g in zip(wrt, grads):
        name = spec.positional[i].name
        t.assert_close(g, expected[name], dtype="float64", quantity="gradients", call=call, backend=backend.name,
                       what=f"golden {entry['id']} d/d {name}")
