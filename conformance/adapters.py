"""Backend adapters: the only framework-specific code the conformance suite needs.

An adapter turns NumPy test inputs into a backend's arrays, calls a function of the backend's module, and
returns the value and the gradients as float64 NumPy arrays. The suite never imports torch or jax itself.

A third-party backend is a module exporting the dpkd API plus ``DPKD_FRAMEWORK = "numpy" | "torch" | "jax"``
(the array library its functions take); ``adapter_for_module`` picks the adapter from that attribute.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["BackendAdapter", "NumpyAdapter", "TorchAdapter", "JaxAdapter", "adapter_for_module", "scalar_of", "map_out"]


def scalar_of(out: Any) -> Any:
    """The differentiated output of a dpkd function: the first field of a result tuple, else the value."""
    return out[0] if isinstance(out, tuple) else out


@dataclass
class BackendAdapter:
    name: str
    module: ModuleType
    dtypes: tuple[str, ...] = ("float64", "float32")
    framework: str = field(default="numpy", init=False)
    #: functions this run accepts as missing (``--dpkd-allow-missing``): skipped, and listed in the summary
    allow_missing: frozenset[str] = field(default=frozenset(), init=False)

    def function(self, fn_name: str) -> Callable[..., Any]:
        return getattr(self.module, fn_name)

    def asarray(self, x: Any, dtype: str | None = None) -> Any:
        raise NotImplementedError

    def to_numpy(self, x: Any) -> Any:
        raise NotImplementedError

    def rounded(self, x: np.ndarray, dtype: str) -> np.ndarray:
        """What the backend sees of ``x`` after the cast to ``dtype``, back in float64."""
        return self.to_numpy(self.asarray(x, dtype))

    def convert(self, x: Any, dtype: str | None) -> Any:
        """A NumPy array as a backend array; the arrays inside a named tuple (a fused path's teacher) too."""
        if isinstance(x, np.ndarray):
            return self.asarray(x, dtype)
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*(self.convert(f, dtype) for f in x))
        return x

    def convert_args(self, args: Sequence[Any], dtype: str | None) -> list[Any]:
        return [self.convert(a, dtype) for a in args]

    def convert_kwargs(self, kwargs: dict[str, Any], dtype: str | None) -> dict[str, Any]:
        """Array-valued keyword arguments (lengths, a fused path's bias and teacher) become backend arrays."""
        return {k: self.convert(v, dtype) for k, v in kwargs.items()}

    def call(self, fn_name: str, args: Sequence[Any], kwargs: dict[str, Any], dtype: str | None = None) -> Any:
        out = self.function(fn_name)(*self.convert_args(args, dtype), **self.convert_kwargs(kwargs, dtype))
        return map_out(out, self.to_numpy)

    def value_and_grad(
        self, fn_name: str, args: Sequence[Any], kwargs: dict[str, Any], wrt: Sequence[int],
        dtype: str | None = None, wrt_kwargs: Sequence[str] = (),
    ) -> tuple[Any, list[np.ndarray]]:
        """Value of the call, and the gradient of sum(scalar_of(out)) w.r.t. the positional args ``wrt``, then
        the keyword args ``wrt_kwargs`` (a fused path's bias)."""
        raise NotImplementedError


def map_out(out: Any, f: Callable[[Any], Any]) -> Any:
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(map_out(o, f) for o in out))
    if isinstance(out, tuple):
        return tuple(map_out(o, f) for o in out)
    if isinstance(out, dict):
        return {k: map_out(o, f) for k, o in out.items()}
    if isinstance(out, (float, int, bool)) or out is None:
        return out
    return f(out)


def _is_float_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)


class NumpyAdapter(BackendAdapter):
    """The reference itself: gradients come from the spec's analytic ``*_grad`` functions."""

    def __init__(self, name: str = "numpy", module: ModuleType | None = None):
        super().__init__(name, module or importlib.import_module("dpkd.spec"), ("float64",))
        self.framework = "numpy"

    def asarray(self, x: Any, dtype: str | None = None) -> Any:
        x = np.asarray(x)
        return x.astype(dtype) if dtype is not None and np.issubdtype(x.dtype, np.floating) else x

    def to_numpy(self, x: Any) -> Any:
        x = np.asarray(x)
        return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x

    def value_and_grad(self, fn_name, args, kwargs, wrt, dtype=None, wrt_kwargs=()):
        fn = self.function(fn_name)
        grad_fn = self.function(fn_name + "_grad")
        conv = self.convert_args(args, dtype)
        kwargs = self.convert_kwargs(kwargs, dtype)
        value = map_out(fn(*conv, **kwargs), self.to_numpy)
        grads = grad_fn(*conv, **kwargs)
        names = list(inspect.signature(fn).parameters)
        return value, [np.asarray(grads.get(names[i], np.zeros_like(args[i])), dtype=np.float64) for i in wrt]


class TorchAdapter(BackendAdapter):
    def __init__(self, name: str = "torch", module: ModuleType | None = None):
        import torch  # noqa: F401  (fail here, not mid-test, when torch is absent)

        super().__init__(name, module or importlib.import_module("dpkd.backends.torch"),
                         ("float64", "float32", "bfloat16"))
        self.framework = "torch"

    def asarray(self, x: Any, dtype: str | None = None) -> Any:
        import torch

        # np.array(copy, order="C") rather than np.ascontiguousarray, which turns a 0-d array into shape (1,)
        t = torch.from_numpy(np.array(x, order="C", copy=True))
        if dtype is not None and t.is_floating_point():
            t = t.to(getattr(torch, dtype))
        return t

    def to_numpy(self, x: Any) -> Any:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach()
            return (x.double() if x.is_floating_point() else x).cpu().numpy()
        return np.asarray(x)

    def value_and_grad(self, fn_name, args, kwargs, wrt, dtype=None, wrt_kwargs=()):
        import torch

        conv = self.convert_args(args, dtype)
        kwargs = self.convert_kwargs(kwargs, dtype)
        for i in wrt:
            conv[i] = conv[i].detach().clone().requires_grad_(True)
        for k in wrt_kwargs:
            kwargs[k] = kwargs[k].detach().clone().requires_grad_(True)
        out = self.function(fn_name)(*conv, **kwargs)
        s = scalar_of(out)
        s = s.sum() if s.ndim else s
        leaves = [conv[i] for i in wrt] + [kwargs[k] for k in wrt_kwargs]
        grads = torch.autograd.grad(s, leaves, allow_unused=True)
        return map_out(out, self.to_numpy), [
            np.zeros(tuple(x.shape)) if g is None else self.to_numpy(g) for x, g in zip(leaves, grads)
        ]


class JaxAdapter(BackendAdapter):
    def __init__(self, name: str = "jax", module: ModuleType | None = None):
        import jax

        # The tight float64 comparisons need x64; float32/bfloat16 inputs keep their dtype.
        jax.config.update("jax_enable_x64", True)
        super().__init__(name, module or importlib.import_module("dpkd.backends.jax"),
                         ("float64", "float32", "bfloat16"))
        self.framework = "jax"

    def asarray(self, x: Any, dtype: str | None = None) -> Any:
        import jax.numpy as jnp

        x = np.asarray(x)
        if dtype is not None and np.issubdtype(x.dtype, np.floating):
            return jnp.asarray(x, dtype=getattr(jnp, dtype))
        return jnp.asarray(x)

    def to_numpy(self, x: Any) -> Any:
        import jax.numpy as jnp

        x = np.asarray(x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x)
        return x

    def value_and_grad(self, fn_name, args, kwargs, wrt, dtype=None, wrt_kwargs=()):
        import jax

        conv = self.convert_args(args, dtype)
        kwargs = self.convert_kwargs(kwargs, dtype)
        fn = self.function(fn_name)

        def scalar(*diff):
            full, kw = list(conv), dict(kwargs)
            for i, d in zip(wrt, diff):
                full[i] = d
            for k, d in zip(wrt_kwargs, diff[len(wrt):]):
                kw[k] = d
            out = fn(*full, **kw)
            return scalar_of(out).sum(), out

        leaves = [conv[i] for i in wrt] + [kwargs[k] for k in wrt_kwargs]
        # the value comes from the same trace as the gradient (one compilation of a jitted function, where a
        # separate call would compile its primal again)
        (_, out), grads = jax.value_and_grad(scalar, argnums=tuple(range(len(leaves))), has_aux=True)(*leaves)
        return map_out(out, self.to_numpy), [self.to_numpy(g) for g in grads]


_ADAPTERS = {"numpy": NumpyAdapter, "torch": TorchAdapter, "jax": JaxAdapter}


def adapter_for_module(module_name: str) -> BackendAdapter:
    module = importlib.import_module(module_name)
    framework = getattr(module, "DPKD_FRAMEWORK", None)
    if framework not in _ADAPTERS:
        raise ValueError(
            f"backend module {module_name!r} must define DPKD_FRAMEWORK as one of {tuple(_ADAPTERS)}, "
            f"got {framework!r}"
        )
    return _ADAPTERS[framework](name=module_name, module=module)
