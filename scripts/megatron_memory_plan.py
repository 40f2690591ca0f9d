"""Regenerate the memory plans in integrations/megatron/README.md from the 8-process meta-device simulation.

    python scripts/megatron_memory_plan.py            # rewrite the README section
    python scripts/megatron_memory_plan.py --check    # exit 1 if the README differs from a fresh simulation

The simulation (``dpkd.integrations.megatron.memory_plan``) runs in 8 gloo processes at TP = 8, every
tensor on the meta device: a minute and a few GB of host memory, no GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from dpkd.integrations.megatron import memory_plan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    p.add_argument("--readme", default=str(Path(__file__).resolve().parents[1] / "integrations" / "megatron"
                                           / "README.md"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plans = memory_plan.simulate(Path(tmp) / "plan.json")
    markdown = memory_plan.render_markdown(plans)
    readme = Path(args.readme)
    text = readme.read_text()
    if args.check:
        same = memory_plan.readme_section(text) == markdown
        print("README memory plans are up to date" if same else "README memory plans differ:\n" + markdown)
        return 0 if same else 1
    readme.write_text(memory_plan.with_section(text, markdown))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
