"""Independent re-derivation of every dpkd.spec loss / metric / gradient from spec/README.md + CONVENTIONS.md.

The reference values are computed in plain Python (``math`` + loops over lists, ``math.fsum`` for sums);
NumPy is used only to build seeded inputs and to call ``dpkd.spec``. Agreement is required to
``math.isclose(rel_tol=1e-12, abs_tol=1e-12)``.
"""

from __future__ import annotations

import math

import dpkd.spec as S
import numpy as np
import pytest

REL = 1e-12
ABS = 1e-12
SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------
# plain-Python math
# ----------------------------------------------------------------------------------------------------------
def sigmoid(z):
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def softplus(z):
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def logsumexp(xs):
    m = max(xs)
    return m + math.log(math.fsum(math.exp(x - m) for x in xs))


def log_softmax(xs):
    lse = logsumexp(xs)
    return [x - lse for x in xs]


def softmax(xs):
    return [math.exp(v) for v in log_softmax(xs)]


def argmax(xs):
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def kl(logp, logq):
    """KL(p || q) from log-probabilities."""
    return math.fsum(math.exp(lp) * (lp - lq) for lp, lq in zip(logp, logq))


def mean(xs):
    return math.fsum(xs) / len(xs)


def flatten(x):
    if isinstance(x, (list, tuple)):
        out = []
        for e in x:
            out.extend(flatten(e))
        return out
    return [float(x)]


def shape_of(x):
    if isinstance(x, (list, tuple)):
        return (len(x),) + (shape_of(x[0]) if len(x) else ())
    return ()


def isclose(x, y):
    return math.isclose(float(x), float(y), rel_tol=REL, abs_tol=ABS)


def assert_close(actual, expected, what=""):
    """`actual` from dpkd.spec (array/scalar), `expected` a nested list or float from the re-derivation."""
    arr = np.asarray(actual, dtype=np.float64)
    assert arr.shape == shape_of(expected), f"{what}: shape {arr.shape} != {shape_of(expected)}"
    got = arr.reshape(-1).tolist()
    exp = flatten(expected)
    bad = [(i, g, e) for i, (g, e) in enumerate(zip(got, exp)) if not isclose(g, e)]
    assert not bad, f"{what}: {len(bad)} mismatches (index, spec, rederived): {bad[:6]}"


def reduce_list(vals, reduction, shape):
    """Reduce a flat list of per-element losses; 'none' reshapes to `shape`."""
    if reduction == "mean":
        return math.fsum(vals) / len(vals)
    if reduction == "sum":
        return math.fsum(vals)
    return unflatten(vals, shape)


def unflatten(vals, shape):
    if len(shape) == 0:
        return vals[0]
    if len(shape) == 1:
        return list(vals)
    step = len(vals) // shape[0]
    return [unflatten(vals[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def grad_scale(reduction, n):
    return 1.0 / n if reduction == "mean" else 1.0


# ----------------------------------------------------------------------------------------------------------
# input builders (numpy only to draw numbers)
# ----------------------------------------------------------------------------------------------------------
def seq_inputs(seed, shape=(6,)):
    rng = np.random.default_rng(seed)
    a = -rng.uniform(5.0, 60.0, shape)
    b = -rng.uniform(5.0, 60.0, shape)
    c = -rng.uniform(5.0, 60.0, shape)
    d = -rng.uniform(5.0, 60.0, shape)
    lt = rng.integers(3, 40, shape)
    ls = rng.integers(3, 40, shape)
    return a, b, c, d, lt, ls


def dpop_inputs(seed, shape=(8,)):
    """c - a kept clear of 0 (both signs present) so that k = 1[c > a] is unambiguous."""
    rng = np.random.default_rng(seed)
    a = -rng.uniform(5.0, 40.0, shape)
    b = -rng.uniform(5.0, 40.0, shape)
    sign = np.where(np.arange(np.prod(shape)).reshape(shape) % 2 == 0, 1.0, -1.0)
    c = a + sign * rng.uniform(0.5, 5.0, shape)
    d = -rng.uniform(5.0, 40.0, shape)
    return a, b, c, d


def top_gap(row):
    s = sorted(row, reverse=True)
    return s[0] - s[1]


def token_inputs(seed, shape=(2, 4, 7), scale=2.0, force_agree=((0, 1), (1, 2))):
    """Student/teacher logits with clear arg-max gaps, a 0/1 mask with zeros and ones, both agreeing and
    disagreeing positions."""
    rng = np.random.default_rng(seed)
    B, T, V = shape
    while True:
        Sl = rng.normal(0.0, scale, shape)
        Tl = rng.normal(0.0, scale, shape)
        for b_, t_ in force_agree:  # make teacher argmax == student argmax by swapping two teacher entries
            i, j = int(np.argmax(Tl[b_, t_])), int(np.argmax(Sl[b_, t_]))
            Tl[b_, t_, i], Tl[b_, t_, j] = Tl[b_, t_, j], Tl[b_, t_, i]
        ok = all(top_gap(Sl[x, y].tolist()) > 0.05 and top_gap(Tl[x, y].tolist()) > 0.05
                 for x in range(B) for y in range(T))
        agree = [int(np.argmax(Sl[x, y])) == int(np.argmax(Tl[x, y])) for x in range(B) for y in range(T)]
        # DPOP: keep c - a = P[y_t] - Q[y_t] clear of 0
        gaps = []
        for x in range(B):
            for y in range(T):
                yt = argmax(Tl[x, y].tolist())
                gaps.append(log_softmax(Tl[x, y].tolist())[yt] - log_softmax(Sl[x, y].tolist())[yt])
        ok = ok and any(agree) and not all(agree) and min(abs(g) for g in gaps) > 1e-3
        if ok:
            break
    mask = (rng.uniform(size=(B, T)) < 0.7).astype(np.int64)
    mask[0, 0] = 1
    mask[1, -1] = 0
    return Sl, Tl, mask


def akl_ok(Tl, mu, temperature):
    """Cumulative teacher mass kept clear of mu, no near-ties among teacher probabilities."""
    B, T, V = Tl.shape
    for x in range(B):
        for y in range(T):
            p = softmax([v / temperature for v in Tl[x, y].tolist()])
            ps = sorted(p, reverse=True)
            if min(ps[i] - ps[i + 1] for i in range(len(ps) - 1)) < 1e-4:
                return False
            csum = 0.0
            for v in ps:
                csum += v
                if abs(csum - mu) < 1e-3:
                    return False
    return True


def list3(arr):
    return np.asarray(arr).tolist()


# ----------------------------------------------------------------------------------------------------------
# sequence-level DPKD (Eq. 8 / Eq. 9 / cDPO / reference-free)
# ----------------------------------------------------------------------------------------------------------
NAMES4 = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")


def ref_dpkd(a, b, c, d, lt, ls, beta, eps, rf):
    loss, cr, rr, gh = [], [], [], []
    for i in range(len(a)):
        ci = 0.0 if rf else c[i]
        di = 0.0 if rf else d[i]
        Lt = 1.0 if lt is None else float(lt[i])
        Ls = 1.0 if ls is None else float(ls[i])
        h = (a[i] - ci) / Lt - (b[i] - di) / Ls
        loss.append((1.0 - eps) * softplus(-beta * h) + eps * softplus(beta * h))
        cr.append(beta * (a[i] - ci) / Lt)
        rr.append(beta * (b[i] - di) / Ls)
        gh.append((beta * (sigmoid(beta * h) - (1.0 - eps)), Lt, Ls))
    return loss, cr, rr, gh


DPKD_CASES = [
    dict(lengths=False, beta=0.1, eps=0.0, rf=False),   # Eq. 8
    dict(lengths=True, beta=0.1, eps=0.0, rf=False),    # Eq. 9
    dict(lengths=True, beta=0.7, eps=0.0, rf=False),
    dict(lengths=False, beta=0.5, eps=0.2, rf=False),   # cDPO
    dict(lengths=True, beta=0.3, eps=0.5, rf=False),
    dict(lengths=False, beta=0.2, eps=0.0, rf=True),    # reference-free
    dict(lengths=True, beta=0.2, eps=0.1, rf=True),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", DPKD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dpkd_loss(seed, case, reduction):
    shape = (2, 3) if seed == 2 else (6,)
    a, b, c, d, lt, ls = seq_inputs(seed, shape)
    A, B_, C, D = (x.reshape(-1).tolist() for x in (a, b, c, d))
    LT = lt.reshape(-1).tolist() if case["lengths"] else None
    LS = ls.reshape(-1).tolist() if case["lengths"] else None
    loss, cr, rr, _ = ref_dpkd(A, B_, C, D, LT, LS, case["beta"], case["eps"], case["rf"])
    kw = dict(beta=case["beta"], label_smoothing=case["eps"], reference_free=case["rf"], reduction=reduction)
    if case["lengths"]:
        kw.update(chosen_lengths=lt, rejected_lengths=ls)
    out = S.dpkd_loss(a, b, c, d, **kw)
    assert_close(out.loss, reduce_list(loss, reduction, shape), "loss")
    assert_close(out.chosen_rewards, unflatten(cr, shape), "chosen_rewards")
    assert_close(out.rejected_rewards, unflatten(rr, shape), "rejected_rewards")
    if case["rf"]:
        out2 = S.dpkd_loss(a, b, None, None, **kw)
        assert_close(out2.loss, reduce_list(loss, reduction, shape), "loss (reference None)")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", DPKD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dpkd_loss_grad(seed, case, reduction):
    a, b, c, d, lt, ls = seq_inputs(seed)
    A, B_, C, D = (x.tolist() for x in (a, b, c, d))
    LT = lt.tolist() if case["lengths"] else None
    LS = ls.tolist() if case["lengths"] else None
    _, _, _, gh = ref_dpkd(A, B_, C, D, LT, LS, case["beta"], case["eps"], case["rf"])
    s = grad_scale(reduction, len(A))
    ga = [s * g / Lt for g, Lt, Ls in gh]
    gb = [-s * g / Ls for g, Lt, Ls in gh]
    gc = [0.0 if case["rf"] else -s * g / Lt for g, Lt, Ls in gh]
    gd = [0.0 if case["rf"] else s * g / Ls for g, Lt, Ls in gh]
    kw = dict(beta=case["beta"], label_smoothing=case["eps"], reference_free=case["rf"], reduction=reduction)
    if case["lengths"]:
        kw.update(chosen_lengths=lt, rejected_lengths=ls)
    grads = S.dpkd_loss_grad(a, b, c, d, **kw)
    assert set(grads) == set(NAMES4)
    for name, exp in zip(NAMES4, (ga, gb, gc, gd)):
        assert_close(grads[name], exp, name)
    if case["rf"]:
        g2 = S.dpkd_loss_grad(a, b, None, None, **kw)
        assert set(g2) == set(NAMES4[:2])
        assert_close(g2[NAMES4[0]], ga, "a (reference None)")
        assert_close(g2[NAMES4[1]], gb, "b (reference None)")


def test_paper_typo_gradient_eq11():
    """(a,b,c,d) = (−5,−3,−4,−9), β = 0.7: ∂L/∂a = −β σ(−βh) ≈ −0.6948, not the printed −β σ(βh) ≈ −0.0052."""
    a, b, c, d = (np.array([v]) for v in (-5.0, -3.0, -4.0, -9.0))
    beta = 0.7
    h = (-5.0 - -4.0) - (-3.0 - -9.0)
    assert h == -7.0
    corrected = -beta * sigmoid(-beta * h)
    printed = -beta * sigmoid(beta * h)
    assert abs(corrected - (-0.6948)) < 5e-5
    assert abs(printed - (-0.0052)) < 5e-5
    g = S.dpkd_loss_grad(a, b, c, d, beta=beta, reduction="sum")
    ga = float(np.asarray(g["policy_chosen_logps"]).reshape(-1)[0])
    assert isclose(ga, corrected)
    assert abs(ga - printed) > 0.5
    # the other three entries: β σ(−βh)·(−1, +1, +1, −1)
    w = beta * sigmoid(-beta * h)
    for name, sgn in zip(NAMES4, (-1, 1, 1, -1)):
        assert isclose(float(np.asarray(g[name]).reshape(-1)[0]), sgn * w)
    # finite differences of the spec's own loss
    eps = 1e-6
    lp = float(S.dpkd_loss(a + eps, b, c, d, beta=beta, reduction="sum").loss)
    lm = float(S.dpkd_loss(a - eps, b, c, d, beta=beta, reduction="sum").loss)
    assert abs((lp - lm) / (2 * eps) - corrected) < 1e-7
    # and the loss value itself
    assert isclose(float(S.dpkd_loss(a, b, c, d, beta=beta, reduction="sum").loss), softplus(-beta * h))


# ----------------------------------------------------------------------------------------------------------
# IPO / CPO / SimPO / DPOP
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ipo_loss(seed, length_normalize, tau, reduction):
    a, b, c, d, lt, ls = seq_inputs(seed)
    A, B_, C, D, LT, LS = (x.tolist() for x in (a, b, c, d, lt, ls))
    loss, cr, rr = [], [], []
    for i in range(len(A)):
        Lt, Ls = (float(LT[i]), float(LS[i])) if length_normalize else (1.0, 1.0)
        h = (A[i] - C[i]) / Lt - (B_[i] - D[i]) / Ls
        loss.append((h - 1.0 / (2.0 * tau)) ** 2)
        cr.append(tau * (A[i] - C[i]) / Lt)
        rr.append(tau * (B_[i] - D[i]) / Ls)
    kw = dict(tau=tau, length_normalize=length_normalize, reduction=reduction)
    if length_normalize:
        kw.update(chosen_lengths=lt, rejected_lengths=ls)
    out = S.ipo_loss(a, b, c, d, **kw)
    assert_close(out.loss, reduce_list(loss, reduction, (len(A),)), "loss")
    assert_close(out.chosen_rewards, cr, "chosen_rewards")
    assert_close(out.rejected_rewards, rr, "rejected_rewards")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_lengths", [True, False])
@pytest.mark.parametrize("beta,w,eps", [(0.1, 1.0, 0.0), (0.5, 0.3, 0.0), (0.2, 1.0, 0.25), (1.0, 0.0, 0.0)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cpo_loss(seed, with_lengths, beta, w, eps, reduction):
    a, b, _, _, lt, _ = seq_inputs(seed)
    A, B_, LT = a.tolist(), b.tolist(), lt.tolist()
    loss = []
    for i in range(len(A)):
        z = beta * (A[i] - B_[i])
        nll = -A[i] / float(LT[i]) if with_lengths else -A[i]
        loss.append((1.0 - eps) * softplus(-z) + eps * softplus(z) + w * nll)
    kw = dict(beta=beta, nll_weight=w, label_smoothing=eps, reduction=reduction)
    if with_lengths:
        kw["chosen_lengths"] = lt
    out = S.cpo_loss(a, b, **kw)
    assert_close(out.loss, reduce_list(loss, reduction, (len(A),)), "loss")
    assert_close(out.chosen_rewards, [beta * x for x in A], "chosen_rewards")
    assert_close(out.rejected_rewards, [beta * x for x in B_], "rejected_rewards")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 1.0, 0.0), (2.5, 0.5, 0.0), (1.0, -0.7, 0.1), (2.0, 1.5, 0.5)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_simpo_loss(seed, beta, gamma, eps, reduction):
    a, b, _, _, lt, ls = seq_inputs(seed)
    A, B_, LT, LS = a.tolist(), b.tolist(), lt.tolist(), ls.tolist()
    loss, cr, rr = [], [], []
    for i in range(len(A)):
        z = beta * A[i] / LT[i] - beta * B_[i] / LS[i] - gamma
        loss.append((1.0 - eps) * softplus(-z) + eps * softplus(z))
        cr.append(beta * A[i] / LT[i])
        rr.append(beta * B_[i] / LS[i])
    out = S.simpo_loss(a, b, chosen_lengths=lt, rejected_lengths=ls, beta=beta, gamma=gamma,
                       label_smoothing=eps, reduction=reduction)
    assert_close(out.loss, reduce_list(loss, reduction, (len(A),)), "loss")
    assert_close(out.chosen_rewards, cr, "chosen_rewards")
    assert_close(out.rejected_rewards, rr, "rejected_rewards")


def ref_dpop(A, B_, C, D, beta, lam, form):
    loss, grads = [], []
    for i in range(len(A)):
        h = (A[i] - C[i]) - (B_[i] - D[i])
        P = max(0.0, C[i] - A[i])
        k = 1.0 if C[i] > A[i] else 0.0
        if form == "smaug":
            H = h - lam * P
            loss.append(softplus(-beta * H))
            g = beta * (sigmoid(beta * H) - 1.0)
            grads.append((g * (1.0 + lam * k), -g, g * (-1.0 - lam * k), g))
        else:
            loss.append(softplus(-beta * h) + lam * P)
            g = beta * (sigmoid(beta * h) - 1.0)
            grads.append((g - lam * k, -g, -g + lam * k, g))
    return loss, grads


DPOP_CASES = [(0.1, 50.0), (0.5, 2.0), (0.05, 0.0)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("form", ["smaug", "released"])
@pytest.mark.parametrize("beta,lam", DPOP_CASES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dpop_loss(seed, form, beta, lam, reduction):
    a, b, c, d = dpop_inputs(seed)
    A, B_, C, D = (x.tolist() for x in (a, b, c, d))
    loss, _ = ref_dpop(A, B_, C, D, beta, lam, form)
    out = S.dpop_loss(a, b, c, d, beta=beta, lambda_=lam, form=form, reduction=reduction)
    assert_close(out.loss, reduce_list(loss, reduction, (len(A),)), "loss")
    assert_close(out.chosen_rewards, [beta * (x - y) for x, y in zip(A, C)], "chosen_rewards")
    assert_close(out.rejected_rewards, [beta * (x - y) for x, y in zip(B_, D)], "rejected_rewards")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("form", ["smaug", "released"])
@pytest.mark.parametrize("beta,lam", DPOP_CASES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dpop_loss_grad(seed, form, beta, lam, reduction):
    a, b, c, d = dpop_inputs(seed)
    A, B_, C, D = (x.tolist() for x in (a, b, c, d))
    _, grads = ref_dpop(A, B_, C, D, beta, lam, form)
    s = grad_scale(reduction, len(A))
    got = S.dpop_loss_grad(a, b, c, d, beta=beta, lambda_=lam, form=form, reduction=reduction)
    assert set(got) == set(NAMES4)
    for j, name in enumerate(NAMES4):
        assert_close(got[name], [s * g[j] for g in grads], name)


# ----------------------------------------------------------------------------------------------------------
# token-level DPKD (released code)
# ----------------------------------------------------------------------------------------------------------
def ref_token(Sl, Tl, mask, beta, form, eps, rf, lam):
    """Per-position quantities over a [B, T, V] nested list."""
    rows = []
    for x in range(len(Sl)):
        for y in range(len(Sl[x])):
            s, t, m = Sl[x][y], Tl[x][y], float(mask[x][y])
            Q, P = log_softmax(s), log_softmax(t)
            yt, ys = argmax(t), argmax(s)
            a, b, c, d = Q[yt], Q[ys], P[yt], P[ys]
            h = (a - b) if rf else (a - b) - (c - d)
            if form == "sigmoid":
                ell = (1.0 - eps) * softplus(-beta * h) + eps * softplus(beta * h)
                g = beta * (sigmoid(beta * h) - (1.0 - eps))
            elif form == "ipo":
                ell = (h - 1.0 / (2.0 * beta)) ** 2
                g = 2.0 * (h - 1.0 / (2.0 * beta))
            else:
                ell = softplus(-beta * h) + lam * max(0.0, c - a)
                g = None
            rows.append(dict(m=m, ell=ell, g=g, yt=yt, ys=ys, cr=beta * (a - c) * m, rr=beta * (b - d) * m,
                             pos=(x, y), h=h))
    return rows


def token_reduce(rows, reduction, normalizer, BT):
    vals = [r["m"] * r["ell"] for r in rows]
    if reduction == "sum":
        return math.fsum(vals)
    if reduction == "mean":
        den = normalizer if normalizer is not None else math.fsum(r["m"] for r in rows)
        return math.fsum(vals) / den
    return unflatten(vals, BT)


TOKEN_CASES = [
    dict(form="sigmoid", beta=0.1, eps=0.0, rf=False),
    dict(form="sigmoid", beta=0.7, eps=0.0, rf=False),
    dict(form="sigmoid", beta=0.3, eps=0.2, rf=False),
    dict(form="sigmoid", beta=0.1, eps=0.0, rf=True),
    dict(form="sigmoid", beta=0.5, eps=0.4, rf=True),
    dict(form="ipo", beta=0.1, eps=0.0, rf=False),
    dict(form="ipo", beta=0.5, eps=0.0, rf=True),
    dict(form="dpop", beta=0.1, eps=0.0, rf=False, lam=50.0),
    dict(form="dpop", beta=0.4, eps=0.0, rf=False, lam=3.0),
]
TOKEN_RED = [("none", None), ("mean", None), ("mean", 17.0), ("sum", None)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("reduction,normalizer", TOKEN_RED)
def test_dpkd_token_loss(seed, case, reduction, normalizer):
    Sl, Tl, mask = token_inputs(seed)
    lam = case.get("lam", 50.0)
    rows = ref_token(list3(Sl), list3(Tl), list3(mask), case["beta"], case["form"], case["eps"], case["rf"], lam)
    # structural fact 1 (spec/README.md §4): h <= 0 everywhere unless reference-free (then a - b <= 0 too)
    assert all(r["h"] <= 1e-15 for r in rows)
    m_in = mask.astype(bool) if seed == 1 else mask  # bool and 0/1 masks
    out = S.dpkd_token_loss(Sl, Tl, m_in, beta=case["beta"], form=case["form"], label_smoothing=case["eps"],
                            reference_free=case["rf"], lambda_=lam, normalizer=normalizer, reduction=reduction)
    BT = mask.shape
    assert_close(out.loss, token_reduce(rows, reduction, normalizer, BT), "loss")
    agree = math.fsum(r["m"] * (1.0 if r["yt"] == r["ys"] else 0.0) for r in rows)
    assert_close(out.agreement_rate, agree / max(math.fsum(r["m"] for r in rows), 1.0), "agreement_rate")
    assert_close(out.chosen_rewards, unflatten([r["cr"] for r in rows], BT), "chosen_rewards")
    assert_close(out.rejected_rewards, unflatten([r["rr"] for r in rows], BT), "rejected_rewards")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", [c for c in TOKEN_CASES if c["form"] == "sigmoid"],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("reduction,normalizer", TOKEN_RED)
def test_dpkd_token_loss_grad_sigmoid(seed, case, reduction, normalizer):
    Sl, Tl, mask = token_inputs(seed)
    rows = ref_token(list3(Sl), list3(Tl), list3(mask), case["beta"], "sigmoid", case["eps"], case["rf"], 50.0)
    B, T, V = Sl.shape
    gS = [[[0.0] * V for _ in range(T)] for _ in range(B)]
    gT = [[[0.0] * V for _ in range(T)] for _ in range(B)]
    den = 1.0
    if reduction == "mean":
        den = normalizer if normalizer is not None else math.fsum(r["m"] for r in rows)
    for r in rows:
        x, y = r["pos"]
        coef = r["m"] / den * r["g"]
        if r["yt"] == r["ys"]:
            continue  # ∂h/∂S = e_yt − e_ys = 0
        gS[x][y][r["yt"]] += coef
        gS[x][y][r["ys"]] -= coef
        if not case["rf"]:
            gT[x][y][r["yt"]] -= coef
            gT[x][y][r["ys"]] += coef
    got = S.dpkd_token_loss_grad(Sl, Tl, mask, beta=case["beta"], form="sigmoid", label_smoothing=case["eps"],
                                 reference_free=case["rf"], normalizer=normalizer, reduction=reduction)
    assert set(got) == {"student_logits", "teacher_logits"}
    assert_close(got["student_logits"], gS, "student_logits")
    assert_close(got["teacher_logits"], gT, "teacher_logits")


# ----------------------------------------------------------------------------------------------------------
# distillation baselines
# ----------------------------------------------------------------------------------------------------------
def per_pos(Sl, Tl, tau, fn):
    out = []
    for x in range(len(Sl)):
        for y in range(len(Sl[x])):
            logq = log_softmax([v / tau for v in Sl[x][y]])
            logp = log_softmax([v / tau for v in Tl[x][y]])
            out.append(fn(logq, logp))
    return out


def masked_reduce(vals, mask_flat, reduction, normalizer, shape):
    mv = [m * v for m, v in zip(mask_flat, vals)]
    if reduction == "sum":
        return math.fsum(mv)
    if reduction == "mean":
        den = normalizer if normalizer is not None else math.fsum(mask_flat)
        return math.fsum(mv) / den
    return unflatten(mv, shape)


def jsd_fn(beta):
    def f(logq, logp):
        if beta == 0.0:
            return kl(logp, logq)
        if beta == 1.0:
            return kl(logq, logp)
        q = [math.exp(v) for v in logq]
        p = [math.exp(v) for v in logp]
        logm = [math.log((1.0 - beta) * qi + beta * pi) for qi, pi in zip(q, p)]
        return beta * kl(logp, logm) + (1.0 - beta) * kl(logq, logm)
    return f


def akl_fn(mu):
    def f(logq, logp):
        q = [math.exp(v) for v in logq]
        p = [math.exp(v) for v in logp]
        order = sorted(range(len(p)), key=lambda i: (-p[i], i))  # stable descending
        head, csum = set(), 0.0
        for rank, i in enumerate(order):
            csum += p[i]
            if rank == 0 or csum <= mu:
                head.add(i)
        gh = math.fsum(abs(p[i] - q[i]) for i in head)
        gt = math.fsum(abs(p[i] - q[i]) for i in range(len(p)) if i not in head)
        wh = gh / (gh + gt)
        return wh * kl(logp, logq) + (1.0 - wh) * kl(logq, logp)
    return f


DIV_RED = [("none", None), ("mean", None), ("mean", 11.0), ("sum", None)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name,kw,fn", [
    ("forward_kl", {}, lambda lq, lp: kl(lp, lq)),
    ("reverse_kl", {}, lambda lq, lp: kl(lq, lp)),
    ("generalized_jsd", {"beta": 0.5}, jsd_fn(0.5)),
    ("generalized_jsd", {"beta": 0.1}, jsd_fn(0.1)),
    ("generalized_jsd", {"beta": 0.9}, jsd_fn(0.9)),
    ("generalized_jsd", {"beta": 0.0}, jsd_fn(0.0)),
    ("generalized_jsd", {"beta": 1.0}, jsd_fn(1.0)),
], ids=["fkl", "rkl", "jsd0.5", "jsd0.1", "jsd0.9", "jsd0", "jsd1"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction,normalizer", DIV_RED)
def test_divergences(seed, name, kw, fn, temperature, reduction, normalizer):
    Sl, Tl, mask = token_inputs(seed)
    vals = per_pos(list3(Sl), list3(Tl), temperature, fn)
    exp = masked_reduce(vals, [float(m) for m in mask.reshape(-1).tolist()], reduction, normalizer, mask.shape)
    got = getattr(S, name)(Sl, Tl, mask, temperature=temperature, normalizer=normalizer, reduction=reduction, **kw)
    assert_close(got, exp, name)


def test_generalized_jsd_endpoints_discontinuity():
    """β = 0 / 1 are forward / reverse KL, while the mixture form tends to 0 near the end points."""
    Sl, Tl, mask = token_inputs(0)
    for beta, fn in ((0.0, lambda lq, lp: kl(lp, lq)), (1.0, lambda lq, lp: kl(lq, lp))):
        exp = masked_reduce(per_pos(list3(Sl), list3(Tl), 1.0, fn), [float(m) for m in mask.reshape(-1)],
                            "mean", None, mask.shape)
        assert_close(S.generalized_jsd(Sl, Tl, mask, beta=beta), exp, f"jsd beta={beta}")
    for beta in (1e-6, 1.0 - 1e-6):
        near = masked_reduce(per_pos(list3(Sl), list3(Tl), 1.0, jsd_fn(beta)),
                             [float(m) for m in mask.reshape(-1)], "mean", None, mask.shape)
        assert near < 1e-4
        assert math.isclose(float(S.generalized_jsd(Sl, Tl, mask, beta=beta)), near, rel_tol=1e-9, abs_tol=1e-12)


def akl_inputs(seed, mu, temperature):
    for s in range(seed * 1000, seed * 1000 + 1000):
        Sl, Tl, mask = token_inputs(s)
        if akl_ok(Tl, mu, temperature):
            return Sl, Tl, mask
    raise AssertionError("no AKL input clear of the mu boundary")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mu", [0.5, 0.3, 0.8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction,normalizer", DIV_RED)
def test_akl(seed, mu, temperature, reduction, normalizer):
    Sl, Tl, mask = akl_inputs(seed, mu, temperature)
    vals = per_pos(list3(Sl), list3(Tl), temperature, akl_fn(mu))
    exp = masked_reduce(vals, [float(m) for m in mask.reshape(-1).tolist()], reduction, normalizer, mask.shape)
    got = S.akl(Sl, Tl, mask, mu=mu, temperature=temperature, normalizer=normalizer, reduction=reduction)
    assert_close(got, exp, "akl")


def test_akl_equal_distributions_is_zero():
    Sl, _, mask = token_inputs(0)
    got = S.akl(Sl, Sl.copy(), mask, mu=0.5)
    assert np.isfinite(got) and float(got) == 0.0
    got_none = np.asarray(S.akl(Sl, Sl.copy(), mask, reduction="none"))
    assert np.all(got_none == 0.0)


def grad_lists(Sl, Tl, mask, tau, reduction, normalizer, pos_grad):
    """pos_grad(logq, logp) -> (dS/du list, dT/du list) w.r.t. the tempered logits; chain rule adds 1/τ."""
    B, T, V = len(Sl), len(Sl[0]), len(Sl[0][0])
    mflat = [float(m) for row in mask for m in row]
    den = 1.0
    if reduction == "mean":
        den = normalizer if normalizer is not None else math.fsum(mflat)
    gS = [[[0.0] * V for _ in range(T)] for _ in range(B)]
    gT = [[[0.0] * V for _ in range(T)] for _ in range(B)]
    for x in range(B):
        for y in range(T):
            m = float(mask[x][y])
            logq = log_softmax([v / tau for v in Sl[x][y]])
            logp = log_softmax([v / tau for v in Tl[x][y]])
            ds, dt = pos_grad(logq, logp)
            for k in range(V):
                gS[x][y][k] = m / den * ds[k] / tau
                gT[x][y][k] = m / den * dt[k] / tau
    return gS, gT


def rkl_pos_grad(logq, logp):
    q = [math.exp(v) for v in logq]
    p = [math.exp(v) for v in logp]
    r = kl(logq, logp)
    return ([q[k] * (logq[k] - logp[k] - r) for k in range(len(q))],   # spec/README.md §5
            [p[k] - q[k] for k in range(len(q))])


def fkl_pos_grad(logq, logp):
    q = [math.exp(v) for v in logq]
    p = [math.exp(v) for v in logp]
    f = kl(logp, logq)
    return ([q[k] - p[k] for k in range(len(q))],
            [p[k] * (logp[k] - logq[k] - f) for k in range(len(q))])


def akl_pos_grad(mu):
    def g(logq, logp):
        q = [math.exp(v) for v in logq]
        p = [math.exp(v) for v in logp]
        order = sorted(range(len(p)), key=lambda i: (-p[i], i))
        head, csum = set(), 0.0
        for rank, i in enumerate(order):
            csum += p[i]
            if rank == 0 or csum <= mu:
                head.add(i)
        gh = math.fsum(abs(p[i] - q[i]) for i in head)
        gt = math.fsum(abs(p[i] - q[i]) for i in range(len(p)) if i not in head)
        wh = gh / (gh + gt)
        wt = 1.0 - wh
        fs, ft = fkl_pos_grad(logq, logp)
        rs, rt = rkl_pos_grad(logq, logp)
        return ([wh * a + wt * b for a, b in zip(fs, rs)], [wh * a + wt * b for a, b in zip(ft, rt)])
    return g


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction,normalizer", DIV_RED)
def test_reverse_kl_grad(seed, temperature, reduction, normalizer):
    Sl, Tl, mask = token_inputs(seed)
    gS, gT = grad_lists(list3(Sl), list3(Tl), list3(mask), temperature, reduction, normalizer, rkl_pos_grad)
    got = S.reverse_kl_grad(Sl, Tl, mask, temperature=temperature, normalizer=normalizer, reduction=reduction)
    assert set(got) == {"student_logits", "teacher_logits"}
    assert_close(got["student_logits"], gS, "student_logits")
    assert_close(got["teacher_logits"], gT, "teacher_logits")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction,normalizer", DIV_RED)
def test_forward_kl_grad(seed, temperature, reduction, normalizer):
    Sl, Tl, mask = token_inputs(seed)
    gS, gT = grad_lists(list3(Sl), list3(Tl), list3(mask), temperature, reduction, normalizer, fkl_pos_grad)
    got = S.forward_kl_grad(Sl, Tl, mask, temperature=temperature, normalizer=normalizer, reduction=reduction)
    assert_close(got["student_logits"], gS, "student_logits")
    assert_close(got["teacher_logits"], gT, "teacher_logits")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction,normalizer", DIV_RED)
def test_akl_grad_stop_gradient_weights(seed, temperature, reduction, normalizer):
    mu = 0.5
    Sl, Tl, mask = akl_inputs(seed, mu, temperature)
    gS, gT = grad_lists(list3(Sl), list3(Tl), list3(mask), temperature, reduction, normalizer, akl_pos_grad(mu))
    got = S.akl_grad(Sl, Tl, mask, mu=mu, temperature=temperature, normalizer=normalizer, reduction=reduction)
    assert_close(got["student_logits"], gS, "student_logits")
    assert_close(got["teacher_logits"], gT, "teacher_logits")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reduction,normalizer", DIV_RED)
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_cross_entropy(seed, reduction, normalizer, ignore_index):
    Sl, _, mask = token_inputs(seed)
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, Sl.shape[-1], mask.shape)
    labels = np.where(mask.astype(bool), labels, ignore_index)
    L, Lab = list3(Sl), labels.tolist()
    vals, cnt = [], []
    for x in range(len(L)):
        for y in range(len(L[x])):
            if Lab[x][y] == ignore_index:
                vals.append(0.0)
                cnt.append(0.0)
            else:
                vals.append(-log_softmax(L[x][y])[Lab[x][y]])
                cnt.append(1.0)
    exp = masked_reduce(vals, cnt, reduction, normalizer, mask.shape)
    got = S.cross_entropy(Sl, labels, ignore_index=ignore_index, normalizer=normalizer, reduction=reduction)
    assert_close(got, exp, "cross_entropy")


# ----------------------------------------------------------------------------------------------------------
# log-probabilities
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_token_and_sequence_logps(seed, ignore_index):
    rng = np.random.default_rng(200 + seed)
    logits = rng.normal(0.0, 3.0, (2, 3, 5, 9))
    labels = rng.integers(0, 9, (2, 3, 5))
    labels[rng.uniform(size=labels.shape) < 0.3] = ignore_index
    labels[0, 0, :] = ignore_index  # an all-ignored row -> (0.0, 0)
    L, Lab = logits.tolist(), labels.tolist()
    tok = [[[0.0 if Lab[i][j][t] == ignore_index else log_softmax(L[i][j][t])[Lab[i][j][t]]
             for t in range(5)] for j in range(3)] for i in range(2)]
    assert_close(S.token_logps(logits, labels, ignore_index=ignore_index), tok, "token_logps")
    sums, counts = S.sequence_logps(logits, labels, ignore_index=ignore_index)
    assert_close(sums, [[math.fsum(tok[i][j]) for j in range(3)] for i in range(2)], "sequence sums")
    counts = np.asarray(counts)
    assert counts.dtype == np.int64
    assert counts.tolist() == [[sum(1 for t in range(5) if Lab[i][j][t] != ignore_index) for j in range(3)]
                               for i in range(2)]
    assert float(np.asarray(sums)[0, 0]) == 0.0 and counts[0, 0] == 0


# ----------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_lengths", [True, False])
@pytest.mark.parametrize("beta", [0.1, 0.8])
def test_implicit_reward(seed, with_lengths, beta):
    a, _, c, _, lt, _ = seq_inputs(seed)
    A, C, LT = a.tolist(), c.tolist(), lt.tolist()
    exp = [beta * (A[i] - C[i]) / (LT[i] if with_lengths else 1.0) for i in range(len(A))]
    got = S.implicit_reward(a, c, beta=beta, lengths=lt if with_lengths else None)
    assert_close(got, exp, "implicit_reward")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_lengths", [True, False])
@pytest.mark.parametrize("beta", [0.1, 0.8])
def test_preference_metrics(seed, with_lengths, beta):
    a, b, c, d, lt, ls = seq_inputs(seed, (10,))
    A, B_, C, D, LT, LS = (x.tolist() for x in (a, b, c, d, lt, ls))
    cr = [beta * (A[i] - C[i]) / (LT[i] if with_lengths else 1.0) for i in range(10)]
    rr = [beta * (B_[i] - D[i]) / (LS[i] if with_lengths else 1.0) for i in range(10)]
    assert min(abs(x - y) for x, y in zip(cr, rr)) > 1e-6
    kw = dict(beta=beta)
    if with_lengths:
        kw.update(chosen_lengths=lt, rejected_lengths=ls)
    got = S.preference_metrics(a, b, c, d, **kw)
    exp = {
        "rewards/chosen": mean(cr),
        "rewards/rejected": mean(rr),
        "rewards/accuracies": mean([1.0 if x > y else 0.0 for x, y in zip(cr, rr)]),
        "rewards/margins": mean([x - y for x, y in zip(cr, rr)]),
        "logps/chosen": mean(A),
        "logps/rejected": mean(B_),
    }
    for key, val in exp.items():
        assert isinstance(got[key], float), key
        assert isclose(got[key], val), (key, got[key], val)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(5, 11), (2, 3, 11)])
def test_first_token_divergence(seed, shape):
    rng = np.random.default_rng(300 + seed)
    Sl = rng.normal(0.0, 2.0, shape)
    Tl = rng.normal(0.0, 2.0, shape)
    rows_s = Sl.reshape(-1, shape[-1]).tolist()
    rows_t = Tl.reshape(-1, shape[-1]).tolist()
    klds, rklds = [], []
    for s, t in zip(rows_s, rows_t):
        lq, lp = log_softmax(s), log_softmax(t)
        klds.append(kl(lp, lq))
        rklds.append(kl(lq, lp))
    got = S.first_token_divergence(Sl, Tl)
    assert isinstance(got["kld"], float) and isinstance(got["rkld"], float)
    assert isclose(got["kld"], mean(klds))
    assert isclose(got["rkld"], mean(rklds))


# ----------------------------------------------------------------------------------------------------------
# objective
# ----------------------------------------------------------------------------------------------------------
def test_objective_presets():
    assert (S.PAPER_OBJECTIVE.alpha, S.PAPER_OBJECTIVE.lm_coef, S.PAPER_OBJECTIVE.pt_kd_ratio) == (1.0, 0.5, 0.0)
    assert (S.RELEASED_OBJECTIVE.alpha, S.RELEASED_OBJECTIVE.lm_coef,
            S.RELEASED_OBJECTIVE.pt_kd_ratio) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cfg", ["paper", "paper_kd_given", "released", "custom"])
def test_objective(seed, cfg):
    rng = np.random.default_rng(400 + seed)
    sft, dis, ptl, ptk = (float(v) for v in rng.uniform(0.5, 5.0, 4))
    if cfg.startswith("paper"):
        config = S.PAPER_OBJECTIVE
    elif cfg == "released":
        config = S.RELEASED_OBJECTIVE
    else:
        config = S.ObjectiveConfig(alpha=0.3, lm_coef=1.7, pt_kd_ratio=0.25)
    al, lam, ka = config.alpha, config.lm_coef, config.pt_kd_ratio
    coef = {"sft_loss": 1.0 - al, "distil_loss": al, "pt_lm_loss": lam * (1.0 - ka), "pt_kd_loss": lam * ka}
    if cfg == "paper":
        args = dict(sft_loss=sft, distil_loss=dis, pt_lm_loss=ptl, pt_kd_loss=None)
        exp = dis + 0.5 * ptl
    else:
        args = dict(sft_loss=sft, distil_loss=dis, pt_lm_loss=ptl, pt_kd_loss=ptk)
        exp = math.fsum([(1.0 - al) * sft, al * dis, lam * ((1.0 - ka) * ptl + ka * ptk)])
        if cfg == "released":
            assert isclose(exp, 0.5 * sft + 0.5 * dis + 0.25 * ptl + 0.25 * ptk)
        if cfg == "paper_kd_given":
            assert isclose(exp, dis + 0.5 * ptl)
    got = S.objective(args["sft_loss"], args["distil_loss"], args["pt_lm_loss"], args["pt_kd_loss"], config=config)
    assert isclose(float(np.asarray(got)), exp)
    grads = S.objective_grad(args["sft_loss"], args["distil_loss"], args["pt_lm_loss"], args["pt_kd_loss"],
                             config=config)
    given = {k for k, v in args.items() if v is not None}
    assert set(grads) == given
    for k in given:
        assert isclose(float(np.asarray(grads[k])), coef[k]), k
