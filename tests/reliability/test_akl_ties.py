"""AKL's tie rule (spec/README.md "Tie rule"): tied teacher probabilities whose cumulative mass lands exactly
on μ — six tied maxima at ±9984 in bf16 — give one answer in the spec, Torch and JAX (materialised and fused),
whatever the order of the tied tokens."""

import dpkd.spec as spec
import numpy as np
import pytest
import torch
from dpkd.backends import torch as T

TIED = [1, 4, 5, 8, 11, 15]


def _case(seed=0, v=16):
    rng = np.random.default_rng(seed)
    teacher = np.full((2, 3, v), -9984.0)
    teacher[..., TIED] = 9984.0  # bf16-representable; p = 1/6 on each, C_3 = 1/2 = μ exactly
    teacher[1, 2] = rng.normal(size=v)  # and one ordinary position
    student = rng.normal(size=(2, 3, v)) * 3
    mask = np.array([[1, 1, 1], [1, 0, 1]])
    return student, teacher, mask


def test_six_tied_maxima_are_all_head_in_the_spec():
    p_sorted = np.full(6, 1 / 6)
    assert spec.distill._akl_head_sorted(p_sorted, 0.5).all()
    # a tied run below the maximum counts whole: [0.4, 0.1 ×6]: C of the run is 1.0 > μ, so only 0.4 is head
    assert spec.distill._akl_head_sorted(np.array([0.4] + [0.1] * 6), 0.5).tolist() == [True] + [False] * 6
    # without ties, the official rule: C_k ≤ μ plus the first token
    assert spec.distill._akl_head_sorted(np.array([0.35, 0.3, 0.2, 0.15]), 0.5).tolist() == [True, False, False, False]
    assert spec.distill._akl_head_sorted(np.array([0.35, 0.3, 0.2, 0.15]), 0.7).tolist() == [True, True, False, False]


def test_spec_is_invariant_to_the_order_of_tied_tokens():
    s, t, m = _case()
    rng = np.random.default_rng(1)
    for _ in range(5):
        perm = rng.permutation(t.shape[-1])
        assert spec.akl(s[..., perm], t[..., perm], m) == pytest.approx(spec.akl(s, t, m), rel=1e-13)


@pytest.mark.parametrize("mu", [0.5, 1 / 3, 0.9])
def test_torch_and_jax_agree_with_the_spec_on_ties(mu):
    s, t, m = _case()
    want = spec.akl(s, t, m, mu=mu)
    want_grad = spec.akl_grad(s, t, m, mu=mu)["student_logits"]
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    got = T.akl(st, torch.tensor(t), torch.tensor(m), mu=mu)
    got.backward()
    assert got.item() == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(st.grad.numpy(), want_grad, rtol=1e-10, atol=1e-12)
    s16 = torch.tensor(s).to(torch.bfloat16)  # bf16 inputs (the teacher's ±9984 are exact in bf16)
    got16 = T.akl(s16, torch.tensor(t, dtype=torch.bfloat16), torch.tensor(m), mu=mu)
    assert got16.item() == pytest.approx(spec.akl(s16.double().numpy(), t, m, mu=mu), rel=1e-5)

    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from dpkd.backends import jax as J

    value, grad = jax.value_and_grad(lambda x: J.akl(x, jnp.asarray(t), jnp.asarray(m), mu=mu))(jnp.asarray(s))
    assert float(value) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-10, atol=1e-12)


def test_fused_akl_agrees_on_ties():
    """Teacher rows of the lm_head equal for the tied tokens give exactly tied logits in the fused path."""
    rng = np.random.default_rng(2)
    h, v = 8, 16
    w_t = rng.normal(size=(v, h))
    w_t[TIED] = w_t[TIED[0]]  # six tokens with one teacher row: tied probabilities at every position
    t_hidden = rng.normal(size=(2, 3, h)) * 4
    s_hidden, w = rng.normal(size=(2, 3, h)), rng.normal(size=(v, h))
    m = np.array([[1, 1, 1], [1, 0, 1]])
    want = spec.akl(s_hidden @ w.T, t_hidden @ w_t.T, m)
    f = dict(dtype=torch.float64)
    got = T.fused_akl(torch.tensor(s_hidden, **f), torch.tensor(w, **f), torch.tensor(t_hidden, **f),
                      torch.tensor(w_t, **f), torch.tensor(m), chunk_size=2)
    assert got.item() == pytest.approx(want, rel=1e-12)
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from dpkd.backends import jax as J

    got = J.fused_akl(jnp.asarray(s_hidden), jnp.asarray(w), jnp.asarray(t_hidden), jnp.asarray(w_t), jnp.asarray(m),
                      chunk_size=2)
    assert float(got) == pytest.approx(want, rel=1e-12)


def _tied_run_rows(v=40):
    """Teacher logits (as one-feature lm_head rows) whose tied runs straddle μ: six tied maxima (other tokens
    at mass 0 or nearly), and a run of six 0.1s below a 0.4 (C reaches 0.5 inside the run)."""
    top = np.full(v, -60.0)
    top[TIED] = 0.0  # p ≈ 1/6 each: the official rule keeps 3 or 4, the tie rule all 6
    top[20] = -3.0  # one small non-tied token, so a tail exists
    lower = np.full(v, -60.0)
    lower[0], lower[TIED] = np.log(0.4), np.log(0.1)
    return np.stack([top, lower, top[::-1].copy(), lower[::-1].copy()])


@pytest.mark.parametrize("backend", ["torch", "torch-eager", "jax", "jax-eager"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mu", [0.5, 0.55])
def test_fused_kernels_keep_tied_runs_whole(backend, dtype, mu, monkeypatch):
    """The fused per-block kernels follow the tie rule — numba's bit-histogram loops (``backends/_akl_numba.py``)
    and the fallbacks (``_token_kernels``: an eager bit histogram in Torch, a bisection in JAX): value and
    student gradient equal the spec's on rows whose tied runs straddle μ."""
    if backend.endswith("eager"):
        monkeypatch.setenv("DPKD_NO_NUMBA", "1")
    teacher_logits = _tied_run_rows()
    n, v = teacher_logits.shape
    rng = np.random.default_rng(3)
    s_hidden, w = rng.normal(size=(n, 6)), rng.normal(size=(v, 6))
    t_hidden, w_t = np.eye(n), teacher_logits.T  # teacher row i selects column i of w_t: exactly those logits
    mask = np.ones(n)
    cast = {"float32": np.float32, "float64": np.float64}[dtype]
    args = [x.astype(cast) for x in (s_hidden, w, t_hidden, w_t)]
    s64, w64, t64, wt64 = (x.astype(np.float64) for x in args)  # the spec on the rounded inputs
    want = spec.akl(s64 @ w64.T, t64 @ wt64.T, mask, mu=mu)
    want_grad = spec.akl_grad(s64 @ w64.T, t64 @ wt64.T, mask, mu=mu)["student_logits"] @ w64
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=2e-5, atol=2e-6)
    if backend.startswith("torch"):
        sh = torch.tensor(args[0], requires_grad=True)
        got = T.fused_akl(sh, *(torch.tensor(x) for x in args[1:]), torch.tensor(mask), mu=mu)
        got.backward()
        value, grad = got.item(), sh.grad.numpy()
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        from dpkd.backends import jax as J

        jax.clear_caches()  # the kernel is chosen when the computation is traced
        rest = [jnp.asarray(x) for x in args[1:]]
        out, g = jax.value_and_grad(lambda x: J.fused_akl(x, *rest, jnp.asarray(mask), mu=mu))(jnp.asarray(args[0]))
        value, grad = float(out), np.asarray(g)
    np.testing.assert_allclose(value, want, **tol)
    np.testing.assert_allclose(grad, want_grad, **tol)


@pytest.mark.parametrize("compiled", [True, False])
def test_fused_torch_akl_paths_equal_the_spec(compiled, monkeypatch):
    """Both Torch AKL kernels (numba's row loop and the eager histogram) on a vocabulary where the bucket at
    the cut holds many tokens, at one and two threads (rows split between threads), against the spec."""
    if compiled:
        pytest.importorskip("numba")
    else:
        monkeypatch.setenv("DPKD_NO_NUMBA", "1")
    rng = np.random.default_rng(4)
    n, h, v = 12, 8, 3000
    s_hidden, t_hidden = rng.normal(size=(n, h)), rng.normal(size=(n, h))
    w, w_t = rng.normal(size=(v, h)) / np.sqrt(h), rng.normal(size=(v, h)) / np.sqrt(h)
    mask = np.ones(n)
    want = spec.akl(s_hidden @ w.T, t_hidden @ w_t.T, mask, mu=0.4)
    want_grad = spec.akl_grad(s_hidden @ w.T, t_hidden @ w_t.T, mask, mu=0.4)["student_logits"] @ w
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            sh = torch.tensor(s_hidden, requires_grad=True)
            got = T.fused_akl(sh, torch.tensor(w), torch.tensor(t_hidden), torch.tensor(w_t), torch.tensor(mask),
                              mu=0.4)
            got.backward()
            np.testing.assert_allclose(got.item(), want, rtol=1e-10)
            np.testing.assert_allclose(sh.grad.numpy(), want_grad, rtol=1e-9, atol=1e-12)
    finally:
        torch.set_num_threads(threads)
