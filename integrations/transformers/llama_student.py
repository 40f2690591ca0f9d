"""A smaller Llama student initialised from a Llama teacher: kept layers and/or narrower widths.

Layer dropping (DistilBERT's and most distillation inits' recipe): the student keeps teacher layers
``layers`` (or every ``every``-th one) and copies each kept layer's weights exactly, plus the embeddings,
the final norm and the output layer; a student that keeps every layer equals the teacher.

Narrowing (weight sub-cloning, structured-pruning style): ``hidden_size``, ``intermediate_size``,
``num_key_value_heads`` and ``num_attention_heads`` smaller than the teacher's take the *leading* slice of
every weight along that width — the first ``hidden_size`` model dimensions (embeddings, norms, every
projection's input or output side), the first ``intermediate_size`` SwiGLU channels, the first
``num_key_value_heads`` key/value heads and, in each kept group, the first ``num_attention_heads /
num_key_value_heads`` query heads (so every query head keeps the key/value head it was trained with). The
head dimension, RoPE, the vocabulary and the tokenizer stay the teacher's. A narrowed student is an
initialisation, not a function-preserving copy (the RMSNorm statistics change with the width).

Everything is deterministic (no random numbers are drawn; the global RNG is left as it was).

Example::

    teacher, tok = load_smollm2()
    student = llama_student(teacher, every=3)          # layers 0, 3, …, 27 (10 of 30): 64 M parameters
    narrow = llama_student(teacher, every=3, hidden_size=384, num_attention_heads=6, intermediate_size=1024)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

__all__ = ["llama_student", "every_kth_layer"]


def every_kth_layer(num_layers: int, every: int) -> list[int]:
    """Teacher layers kept by ``every``: ``0, every, 2·every, …`` (30 layers, every 3 → 0, 3, …, 27).

    Layer 0 is always kept: on SmolLM2-135M-Instruct dropping it alone raises the perplexity of a plain
    English paragraph from 14 to 1.8e5, dropping the last layer alone only to 76 (``benchmarks/RESULTS.md``)."""
    if not isinstance(every, int) or isinstance(every, bool) or not 1 <= every <= num_layers:
        raise ValueError(f"every_kth_layer: `every` must be an integer in [1, {num_layers}], got {every!r}")
    return list(range(0, num_layers, every))


def llama_student(
    teacher: Any,
    *,
    every: int | None = None,
    layers: Sequence[int] | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_key_value_heads: int | None = None,
    num_attention_heads: int | None = None,
) -> Any:
    """A ``LlamaForCausalLM`` student built from ``teacher`` (a ``LlamaForCausalLM``): teacher layers
    ``layers`` (or :func:`every_kth_layer` of ``every``; default all), widths as given (default the
    teacher's), weights copied as the module docstring says, in the teacher's dtype and on its device, in
    eval mode. Same vocabulary, so the teacher's tokenizer serves the student."""
    from transformers import LlamaForCausalLM

    tcfg = teacher.config
    if getattr(tcfg, "model_type", None) != "llama":
        raise ValueError(f"llama_student: `teacher` must be a Llama model, got model_type "
                         f"{getattr(tcfg, 'model_type', None)!r}")
    keep = _kept_layers(tcfg.num_hidden_layers, every, layers)
    scfg = _student_config(tcfg, len(keep), hidden_size, intermediate_size, num_key_value_heads,
                           num_attention_heads)
    index = _width_index(tcfg, scfg)
    import torch

    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the caller's RNG
        student = LlamaForCausalLM(scfg)
    student.to(dtype=teacher.dtype, device=teacher.device)
    teacher_params = dict(teacher.named_parameters())
    with torch.no_grad():
        for name, param in student.named_parameters():
            param.copy_(_take(teacher_params[_teacher_name(name, keep)], name, index))
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


def _kept_layers(num_layers: int, every: int | None, layers: Sequence[int] | None) -> list[int]:
    if every is not None and layers is not None:
        raise ValueError("llama_student: give `every` or `layers`, not both")
    if every is not None:
        return every_kth_layer(num_layers, every)
    if layers is None:
        return list(range(num_layers))
    keep = list(layers)
    if not keep or any(not isinstance(i, int) or isinstance(i, bool) for i in keep) \
            or keep != sorted(set(keep)) or not 0 <= keep[0] <= keep[-1] < num_layers:
        raise ValueError(f"llama_student: `layers` must be increasing, distinct layer indices in "
                         f"[0, {num_layers}), got {layers!r}")
    return keep


def _student_config(tcfg: Any, n_layers: int, hidden: int | None, inter: int | None, n_kv: int | None,
                    n_heads: int | None) -> Any:
    """The teacher's config with the student's depth and widths, each checked against the teacher's."""
    t_heads, t_kv = tcfg.num_attention_heads, tcfg.num_key_value_heads
    hidden = _width("hidden_size", hidden, tcfg.hidden_size)
    inter = _width("intermediate_size", inter, tcfg.intermediate_size)
    n_kv = _width("num_key_value_heads", n_kv, t_kv)
    # default: the teacher's query heads per key/value head, for the kept key/value heads
    n_heads = n_kv * (t_heads // t_kv) if n_heads is None else _width("num_attention_heads", n_heads, t_heads)
    if n_heads % n_kv or n_heads // n_kv > t_heads // t_kv:
        raise ValueError(f"llama_student: `num_attention_heads` ({n_heads}) must be a multiple of "
                         f"`num_key_value_heads` ({n_kv}) with at most the teacher's {t_heads // t_kv} query "
                         f"heads per key/value head")
    scfg = copy.deepcopy(tcfg)
    scfg.num_hidden_layers, scfg.hidden_size, scfg.intermediate_size = n_layers, hidden, inter
    scfg.num_attention_heads, scfg.num_key_value_heads = n_heads, n_kv
    scfg.head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // t_heads
    return scfg


def _width(name: str, value: int | None, teacher_value: int) -> int:
    if value is None:
        return teacher_value
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= teacher_value:
        raise ValueError(f"llama_student: `{name}` must be an integer in [1, {teacher_value}] (the teacher's), "
                         f"got {value!r}")
    return value


def _width_index(tcfg: Any, scfg: Any) -> dict[str, Any]:
    """Teacher row/column indices each student width takes (leading slices; heads per kept group)."""
    import torch

    hd = scfg.head_dim
    t_group = tcfg.num_attention_heads // tcfg.num_key_value_heads
    s_group = scfg.num_attention_heads // scfg.num_key_value_heads
    q_heads = [g * t_group + j for g in range(scfg.num_key_value_heads) for j in range(s_group)]

    def rows(heads: list[int]) -> Any:
        return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])

    return {"hidden": torch.arange(scfg.hidden_size), "mlp": torch.arange(scfg.intermediate_size),
            "q": rows(q_heads), "kv": rows(list(range(scfg.num_key_value_heads)))}


# module name -> the index each weight dimension takes ("vocab": all of it); a bias takes the first only
_SLICES = {
    "embed_tokens": ("vocab", "hidden"), "lm_head": ("vocab", "hidden"),
    "q_proj": ("q", "hidden"), "k_proj": ("kv", "hidden"), "v_proj": ("kv", "hidden"), "o_proj": ("hidden", "q"),
    "gate_proj": ("mlp", "hidden"), "up_proj": ("mlp", "hidden"), "down_proj": ("hidden", "mlp"),
}


def _take(weight: Any, name: str, index: dict[str, Any]) -> Any:
    """The slice of teacher ``weight`` that student parameter ``name`` takes."""
    module = name.split(".")[-2]
    rule = ("hidden",) if module.endswith("norm") else _SLICES.get(module)
    if rule is None:
        raise ValueError(f"llama_student: no slicing rule for parameter {name!r} (unsupported Llama variant)")
    out = weight
    for dim, which in enumerate(rule[: weight.dim()]):
        if which != "vocab":
            out = out.index_select(dim, index[which].to(weight.device))
    return out


def _teacher_name(student_name: str, keep: list[int]) -> str:
    """``model.layers.<i>.…`` in the student is ``model.layers.<keep[i]>.…`` in the teacher."""
    parts = student_name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        parts[2] = str(keep[int(parts[2])])
    return ".".join(parts)
