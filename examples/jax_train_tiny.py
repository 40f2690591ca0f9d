"""Train a tiny JAX student against a fixed random teacher with sequence-level DPKD (paper Eq. 9).

Plain JAX (no Flax, no optax): the student is a bigram language model (an embedding and an output
matrix), the teacher a fixed random bigram table. Offline DPKD as in Algorithm 1: the teacher samples the
"chosen" responses y_t, the initial student samples the "rejected" responses y_s, both of random lengths;
then every step computes the four sequence log-probabilities with ``sequence_logps`` and minimises
``dpkd_loss`` with length normalisation by a hand-written Adam update inside one ``jax.jit``'d step.

    python examples/jax_train_tiny.py               # sequence-level dpkd_loss (default)
    python examples/jax_train_tiny.py --loss token  # token-level dpkd_token_loss (released code)

Prints the loss every few steps. Sequence level it falls towards 0 (the student learns to prefer the
teacher's responses over its own); token level towards its minimum log 2, reached when the student's
greedy token equals the teacher's at every position (spec/README.md §4, structural facts). Runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from dpkd.backends.jax import dpkd_loss, dpkd_token_loss, sequence_logps

VOCAB, HIDDEN, BATCH, MAX_LEN = 32, 16, 16, 8


def init_student(key: jax.Array) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    return {"emb": 0.5 * jax.random.normal(k1, (VOCAB, HIDDEN)), "out": 0.5 * jax.random.normal(k2, (HIDDEN, VOCAB))}


def student_logits(params: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
    """Next-token logits [..., V] of the bigram student at each input token."""
    return params["emb"][tokens] @ params["out"]


def sample(logits_of, key: jax.Array, first: jax.Array) -> jax.Array:
    """Autoregressive sampling of MAX_LEN tokens after ``first`` [B]; returns [B, MAX_LEN + 1]."""

    def body(prev, k):
        nxt = jax.random.categorical(k, logits_of(prev))
        return nxt, nxt

    _, rest = jax.lax.scan(body, first, jax.random.split(key, MAX_LEN))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def as_batch(seq: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced (inputs, labels) with a random response length in [2, MAX_LEN]: labels beyond it
    are -100, so ``sequence_logps`` returns each response's own length."""
    lengths = jax.random.randint(key, (seq.shape[0], 1), 2, MAX_LEN + 1)
    labels = jnp.where(jnp.arange(MAX_LEN)[None, :] < lengths, seq[:, 1:], -100)
    return seq[:, :-1], labels


def adam(params, grads, state, step, lr=0.03, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam update (Kingma & Ba 2015), written out on the parameter pytree."""
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
    t = step + 1
    new = jax.tree.map(lambda p, m, v: p - lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps),
                       params, m, v)
    return new, {"m": m, "v": v}


def main(loss_kind: str = "sequence", steps: int = 60) -> list[float]:
    key = jax.random.PRNGKey(0)
    k_teacher, k_student, k_first, k_yt, k_ys, k_lt, k_ls = jax.random.split(key, 7)
    teacher_table = 3.0 * jax.random.normal(k_teacher, (VOCAB, VOCAB))  # fixed logits of p(next | prev)
    params = init_student(k_student)
    first = jax.random.randint(k_first, (BATCH,), 0, VOCAB)  # the "prompts"

    # Offline responses: chosen y_t from the teacher, rejected y_s from the initial student.
    y_t = sample(lambda prev: teacher_table[prev], k_yt, first)
    y_s = sample(lambda prev: student_logits(params, prev), k_ys, first)
    chosen_inputs, chosen_labels = as_batch(y_t, k_lt)
    rejected_inputs, rejected_labels = as_batch(y_s, k_ls)
    # The teacher is fixed: its sequence log-probs are computed once (c, d of Eq. 9).
    ref_chosen, _ = sequence_logps(teacher_table[chosen_inputs], chosen_labels)
    ref_rejected, _ = sequence_logps(teacher_table[rejected_inputs], rejected_labels)
    mask = chosen_labels != -100

    def loss_fn(p):
        if loss_kind == "token":
            # released-code form: teacher-forced on the chosen sequences, argmax preference per position
            return dpkd_token_loss(student_logits(p, chosen_inputs), teacher_table[chosen_inputs], mask,
                                   beta=0.1).loss
        a, len_t = sequence_logps(student_logits(p, chosen_inputs), chosen_labels)
        b, len_s = sequence_logps(student_logits(p, rejected_inputs), rejected_labels)
        return dpkd_loss(a, b, ref_chosen, ref_rejected, chosen_lengths=len_t, rejected_lengths=len_s,
                         beta=0.5).loss

    @jax.jit
    def train_step(p, state, step):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        p, state = adam(p, grads, state, step)
        return p, state, loss

    state = {"m": jax.tree.map(jnp.zeros_like, params), "v": jax.tree.map(jnp.zeros_like, params)}
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        params, state, loss = train_step(params, state, step)
        losses.append(float(loss))
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  {loss_kind} DPKD loss {losses[-1]:.4f}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps ({time.perf_counter() - start:.1f} s)")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=("sequence", "token"), default="sequence")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    main(args.loss, args.steps)
