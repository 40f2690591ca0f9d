"""`llama_student`: a smaller Llama from a Llama teacher — kept layers copied exactly, narrower widths as
leading slices, the teacher's tokenizer and RoPE; deterministic; on random tiny Llamas and on SmolLM2."""

import pytest
import torch
from dpkd.integrations.transformers.llama_student import every_kth_layer, llama_student
from dpkd.integrations.transformers.models import tiny_causal_lm


def _teacher(tied=True, n_kv_heads=2, n_layers=6):
    return tiny_causal_lm("llama", 97, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads,
                          tie_word_embeddings=tied, seed=0).eval()


def _ids(vocab=97, shape=(2, 9)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def test_every_kth_layer():
    assert every_kth_layer(30, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert every_kth_layer(30, 1) == list(range(30)) and every_kth_layer(5, 5) == [0]
    for bad in (0, 31, 2.0, True):
        with pytest.raises(ValueError, match="`every`"):
            every_kth_layer(30, bad)


@pytest.mark.parametrize("tied", [True, False])
def test_keeping_every_layer_reproduces_the_teacher(tied):
    teacher = _teacher(tied)
    student = llama_student(teacher)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, teacher(x).logits, rtol=0, atol=0)
    assert student.config.tie_word_embeddings == tied
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied


def test_dropped_layers_student_equals_teacher_run_on_its_kept_layers():
    """Closed form: the student's forward = the teacher's embeddings, kept layers in order, final norm, head."""
    teacher = _teacher(tied=False)
    keep = [0, 2, 5]
    student = llama_student(teacher, layers=keep)
    x = _ids()
    with torch.no_grad():
        h = teacher.model.embed_tokens(x)
        pos = torch.arange(x.shape[1])[None]
        rope = teacher.model.rotary_emb(h, pos)
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
        for i in keep:
            h = teacher.model.layers[i](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        want = teacher.lm_head(teacher.model.norm(h))
        torch.testing.assert_close(student(x).logits, want)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    for j, i in enumerate(keep):
        for (name, p), (tname, tp) in zip(student.model.layers[j].named_parameters(),
                                          teacher.model.layers[i].named_parameters()):
            assert name == tname and torch.equal(p, tp)


def test_narrow_student_takes_leading_slices_and_keeps_each_query_heads_kv_head():
    teacher = _teacher(n_kv_heads=2)  # 4 query heads, 2 per key/value head, head_dim 8
    student = llama_student(teacher, every=2, hidden_size=24, intermediate_size=40, num_key_value_heads=2,
                            num_attention_heads=2)
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (3, 24, 40)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 2, 8)
    assert cfg.vocab_size == teacher.config.vocab_size
    t, s = teacher.model.layers[2].self_attn, student.model.layers[1].self_attn
    q_rows = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])  # query heads 0 and 2: first of each group
    assert torch.equal(s.q_proj.weight, t.q_proj.weight[q_rows, :24])
    assert torch.equal(s.k_proj.weight, t.k_proj.weight[:, :24])
    assert torch.equal(s.v_proj.weight, t.v_proj.weight[:, :24])
    assert torch.equal(s.o_proj.weight, t.o_proj.weight[:24][:, q_rows])
    tm, sm = teacher.model.layers[2].mlp, student.model.layers[1].mlp
    assert torch.equal(sm.gate_proj.weight, tm.gate_proj.weight[:40, :24])
    assert torch.equal(sm.down_proj.weight, tm.down_proj.weight[:24, :40])
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, :24])
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight[:24])
    logits = student(_ids()).logits
    assert logits.shape == (2, 9, 97) and torch.isfinite(logits).all()


def test_student_is_deterministic_leaves_the_rng_and_trains():
    teacher = _teacher()
    state = torch.random.get_rng_state()
    a, b = llama_student(teacher, every=2, hidden_size=16), llama_student(teacher, every=2, hidden_size=16)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    x = _ids()
    loss = a.train()(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in a.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # nothing shared with the teacher


@pytest.mark.parametrize("kwargs, match", [
    ({"every": 2, "layers": [0]}, "not both"), ({"layers": [3, 1]}, "`layers`"), ({"layers": [0, 6]}, "`layers`"),
    ({"layers": []}, "`layers`"), ({"hidden_size": 33}, "`hidden_size`"),
    ({"intermediate_size": 0}, "`intermediate_size`"),
    ({"num_key_value_heads": 3}, "`num_key_value_heads`"), ({"num_attention_heads": 3}, "`num_attention_heads`"),
    ({"num_key_value_heads": 1, "num_attention_heads": 4}, "`num_attention_heads`"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        llama_student(_teacher(), **kwargs)


def test_non_llama_teacher_is_refused():
    with pytest.raises(ValueError, match="`teacher` must be a Llama"):
        llama_student(tiny_causal_lm("gpt2", 50, d_model=16, n_layers=1, n_heads=2))


def test_layer_dropped_smollm2_student(smollm2):
    teacher, tok = smollm2
    student = llama_student(teacher, every=3)
    assert student.config.num_hidden_layers == 10 and student.config.vocab_size == len(tok)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    for j, i in enumerate(every_kth_layer(30, 3)):
        s, t = student.model.layers[j].state_dict(), teacher.model.layers[i].state_dict()
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert sum(p.numel() for p in student.parameters()) == 28_311_552 + 10 * 3_540_096 + 576
    x = torch.tensor([tok("Staying healthy means eating well.")["input_ids"]])
    with torch.no_grad():
        logits = student(x).logits
    assert logits.shape == (1, x.shape[1], 49152) and torch.isfinite(logits).all()
    assert student.generation_config.eos_token_id == teacher.generation_config.eos_token_id
