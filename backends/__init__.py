"""dpkd.backends — implementations of the dpkd API in array frameworks (``torch``, ``jax``).

Each subpackage exports the names and signatures of ``dpkd.spec`` (without the ``*_grad`` functions:
autograd provides those) and is proven equal to the spec by ``pytest conformance/``.
"""
