"""Entry points for the JAX transforms: ``jit`` (options static) and ``checked`` / ``throw`` (value
checks under jit through ``jax.experimental.checkify``).

Why: every dpkd function takes its options as keyword arguments (reduction, β, form, …). They select the
computation and are validated as Python values, so under ``jax.jit`` they must be static.
``jit(fn)`` is ``jax.jit(fn, static_argnames=STATIC_ARGNAMES[fn.__name__])``; array keyword arguments
(``chosen_lengths``, ``rejected_lengths``, ``lengths``) stay traced. Equivalent by hand::

    jax.jit(dpkd_loss, static_argnames=("beta", "label_smoothing", "reference_free", "reduction"))

Value checks (NaN/Inf, lengths ≤ 0, labels outside the vocabulary, non-binary mask, empty mean) raise
eagerly but are skipped while traced. ``checked(fn)`` returns ``fn`` functionalised by checkify: it returns
``(error, output)`` and composes with ``jit`` and ``vmap``; ``throw(error)`` raises the same
``DPKDInputError`` with the same message as the eager call would have::

    err, out = jit(checked(dpkd_loss))(a, b, c, d, chosen_lengths=lt, rejected_lengths=ls, beta=0.1)
    throw(err)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from dpkd.spec.validation import DPKDInputError, options_of
from jax.experimental import checkify

from . import _base

__all__ = ["STATIC_ARGNAMES", "jit", "checked", "throw"]

def _static_argnames() -> dict[str, tuple[str, ...]]:
    """Every public function's options: its declared keyword-only non-array parameters (the spec declares
    them once beside each function and checks the declaration against the signature)."""
    import dpkd.spec as spec

    names = [n for n in spec.__all__ if n[0].islower() and callable(getattr(spec, n)) and not n.endswith("_grad")]
    return {name: tuple(o.name for o in options_of(name)) for name in names}


#: The keyword arguments of each function that are static under ``jax.jit`` (all its non-array options).
STATIC_ARGNAMES: dict[str, tuple[str, ...]] = _static_argnames()


def jit(fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """``jax.jit`` of a dpkd function (or of ``checked(fn)``) with its options marked static.

    Args:
        fn: a public function of ``dpkd.backends.jax`` (looked up by ``__name__`` in ``STATIC_ARGNAMES``).
        **jit_kwargs: passed to ``jax.jit`` (e.g. ``donate_argnums``).

    Example:
        >>> import jax.numpy as jnp
        >>> from dpkd.backends.jax import dpkd_loss, jit
        >>> z = jnp.zeros(3)
        >>> round(float(jit(dpkd_loss)(z, z, z, z, beta=0.5).loss), 4)
        0.6931
    """
    name = getattr(fn, "__name__", None)
    if name not in STATIC_ARGNAMES:
        raise TypeError(f"jit: `fn` must be a public dpkd.backends.jax function, got {fn!r}")
    return jax.jit(fn, static_argnames=STATIC_ARGNAMES[name], **jit_kwargs)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its value checks as ``checkify`` checks: returns ``(error, output)``.

    Composes with ``jit`` / ``jax.jit`` (options static, as for ``fn``) and ``jax.vmap``. Non-array keyword
    arguments are closed over (checkify traces only arrays). Pass the error to ``throw`` (outside jit).

    Example:
        >>> import jax.numpy as jnp
        >>> from dpkd.backends.jax import checked, dpkd_loss, jit, throw
        >>> z = jnp.zeros(2)
        >>> err, out = jit(checked(dpkd_loss))(z, z, z, z, chosen_lengths=jnp.array([1.0, 0.0]),
        ...                                    rejected_lengths=jnp.ones(2))
        >>> try:
        ...     throw(err)
        ... except ValueError as e:
        ...     print(str(e).split(" (")[0])
        dpkd_loss: `chosen_lengths` must be > 0 everywhere
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> tuple[checkify.Error, Any]:
        options = {k: x for k, x in kwargs.items() if not _is_array(x)}
        arrays = {k: x for k, x in kwargs.items() if _is_array(x)}

        def run(*a: Any, **kw: Any) -> Any:
            with _base.emitting_checks():
                return fn(*a, **kw, **options)

        return checkify.checkify(run, errors=checkify.user_checks)(*args, **arrays)

    return wrapper


# checkify decorates the message: "at mapped index 3: <message> (`check` failed)" (the prefix under vmap)
_PREFIX = re.compile(r"^(at mapped index \d+: )+")
_SUFFIX = re.compile(r"\s*\(`check` failed\)\s*$")


def throw(err: checkify.Error) -> None:
    """Raise the first failed value check of a ``checked`` call as ``DPKDInputError``, with exactly the
    message the eager call raises (checkify's decorations — the vmap index, "(`check` failed)" — are
    removed; ``err.get()`` still shows them). Call it outside ``jit``; it does nothing if every check held."""
    message = err.get()
    if message is not None:
        raise DPKDInputError(_SUFFIX.sub("", _PREFIX.sub("", message)))
