"""The Megatron driver reads the one method table: its choices per mode, its hyper-parameters, its losses."""

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the `megatron` extra)")

from dpkd.integrations.methods import METHODS, PairLoss  # noqa: E402

COMMON = ["--cpu", "--num-examples", "16", "--global-batch", "4", "--max-prompt", "120", "--max-length", "140",
          "--lr", "1e-2", "--seed", "3"]


def test_choices_come_from_the_method_table():
    from dpkd.integrations.megatron import distill

    assert set(distill.MODE_METHODS["sequence"]) == {n for n, m in METHODS.items() if isinstance(m.loss(), PairLoss)}
    assert {"dpkd_token", "kd"} <= set(distill.MODE_METHODS["token"])
    assert distill.parse_args(["--mode", "sequence"]).method == "dpkd"
    assert distill.parse_args([]).method == "dpkd_token"
    with pytest.raises(SystemExit):
        distill.parse_args(["--mode", "token", "--method", "ipo"])  # a pair loss needs sequence mode
    with pytest.raises(SystemExit):
        distill.parse_args(["--mode", "sequence", "--method", "ipo", "--method-arg", "tau=-1"])  # out of range


def test_pair_loss_is_the_table_entry():
    """The driver's sequence loss for ipo with tau=0.5 is the backend's ipo_loss (independent call)."""
    from dpkd.backends.torch import ipo_loss
    from dpkd.integrations.megatron import distill

    args = distill.parse_args(["--mode", "sequence", "--method", "ipo", "--method-arg", "tau=0.5"])
    a, b, c, d = (torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]),
                  torch.tensor([-4.5, -3.0]))
    n_t, n_s = torch.tensor([3, 4]), torch.tensor([2, 5])
    got = distill.method_loss(args).fn(a, b, c, d, chosen_lengths=n_t, rejected_lengths=n_s, reduction="sum").loss
    want = ipo_loss(a, b, c, d, tau=0.5, chosen_lengths=n_t.float(), rejected_lengths=n_s.float(),
                    length_normalize=True, reduction="sum").loss
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def body_run(argv):
    from dpkd.integrations.megatron import distill

    return distill.run(distill.parse_args(argv))


@pytest.mark.parametrize("argv", [["--mode", "sequence", "--method", "simpo"], ["--mode", "token", "--method", "kd"]])
def test_other_methods_train_under_tp2(gloo_pool, argv):
    hist = gloo_pool.run(body_run, COMMON + argv + ["--steps", "2", "--max-new-tokens", "4", "--tp", "2"], tp=2)[0]
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[1]["loss"] != hist[0]["loss"]
