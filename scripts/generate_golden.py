"""Write conformance/golden/golden_vectors.json: float64 inputs, outputs and spec gradients of every
registered (function, variant) of ``dpkd.spec.registry``, on small fixed inputs.

Run after an intended change of the spec, or after adding a function or a variant to the registry (and review
the diff): ``python scripts/generate_golden.py``. Each entry's inputs are seeded by its id
(``dpkd_loss[eq9]``), so an addition only adds lines.
``conformance/test_golden_vectors.py`` re-checks every backend, the spec included, against the file.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import dpkd.spec as spec_module
import numpy as np
from dpkd.spec import registry

OUT = Path(__file__).resolve().parents[1] / "conformance" / "golden" / "golden_vectors.json"
PRESETS = ("PAPER_OBJECTIVE", "RELEASED_OBJECTIVE", "DISTIL_ONLY")


def encode(x: Any) -> Any:
    if isinstance(x, np.ndarray) or isinstance(x, np.generic):
        x = np.asarray(x)
        return {"__array__": x.ravel().tolist(), "dtype": str(x.dtype), "shape": list(x.shape)}
    if isinstance(x, dict):
        return {k: encode(v) for k, v in x.items()}
    for name in PRESETS:
        if x is getattr(spec_module, name):
            return {"__preset__": name}
    return x


def fields(out: Any) -> dict[str, Any]:
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return dict(zip(out._fields, out))
    if isinstance(out, tuple):
        return {f"[{i}]": o for i, o in enumerate(out)}
    if isinstance(out, dict):
        return dict(out)
    return {"value": out}


def entry(spec: registry.FunctionSpec, call: registry.Call, tag: str) -> dict[str, Any]:
    out = spec.reference_function()(*call.args, **call.kwargs)
    grads = spec.gradient_function()(*call.args, **call.kwargs) if spec.gradient else None
    return {
        "id": f"{spec.name}[{call.variant}]{tag}",
        "function": spec.name,
        "variant": call.variant,
        "args": [encode(a) for a in call.args],
        "kwargs": encode(dict(call.kwargs)),
        "output": encode(fields(out)),
        "gradients": encode(dict(grads)) if grads is not None else None,
    }


def seed_of(entry_id: str) -> int:
    """The seed of one entry, from its id alone: adding a function or a variant adds entries and leaves every
    other entry's inputs as they were (the file's diff shows only the new lines)."""
    return zlib.crc32(entry_id.encode())


def main() -> None:
    entries = []
    for spec in registry.REGISTRY:
        for j, variant in enumerate(spec.variants):
            tag = f"{spec.name}[{variant.name}]"
            draw = registry.default_draw(spec, variant, seed=seed_of(tag), batch=(2,), tokens=3, vocab=4)
            entries.append(entry(spec, registry.build_call(spec, variant, draw), ""))
            if spec.reductions and "reduction" not in variant.options and j == 0:
                mean = registry.default_draw(spec, variant, seed=seed_of(tag + "-mean"), batch=(2,), tokens=3,
                                             vocab=4, options={"reduction": "mean"})
                entries.append(entry(spec, registry.build_call(spec, variant, mean), "-mean"))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # one entry per line: reviewable diffs; floats are written as their shortest repr (exact round trip)
    lines = ",\n".join(json.dumps(e, separators=(",", ":")) for e in entries)
    OUT.write_text('{"generated_by":"scripts/generate_golden.py","dtype":"float64","entries":[\n' + lines + "\n]}\n")
    print(f"wrote {len(entries)} entries to {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
