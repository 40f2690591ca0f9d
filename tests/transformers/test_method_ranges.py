"""The method table's hyper-parameters accept exactly what the spec's loss functions accept: a value the
job or CLI lets through must not fail later inside the loss, and a value the loss takes must not be refused
up front (the table reads the spec's option declarations; this holds it to them)."""

import math

import pytest
from dpkd.integrations.methods import METHODS
from dpkd.spec import validation as v

#: The spec function each method's loss calls (methods not listed take no loss option: sft, seqkd, minillm).
SPEC_FUNCTION = {"kd": "forward_kl", "akl": "akl", "gkd": "generalized_jsd", "dpkd_token": "dpkd_token_loss",
                 "dpkd_eq8": "dpkd_loss", "dpkd": "dpkd_loss", "ipo": "ipo_loss", "cpo": "cpo_loss",
                 "simpo": "simpo_loss"}

CASES = [(m, h.name) for m, f in SPEC_FUNCTION.items() for h in METHODS[m].hparams
         if h.name in {o.name for o in v.options_of(f)}]


def _option(method: str, name: str) -> v.Option:
    return next(o for o in v.options_of(SPEC_FUNCTION[method]) if o.name == name)


def _valid_values(o: v.Option) -> list:
    if o.kind == "choice":
        return list(o.choices)
    if o.kind == "flag":
        return [True, False]
    out = [o.default, *(o.draw or ())]
    out += [b for b, inclusive in ((o.low, o.low_inclusive), (o.high, o.high_inclusive)) if b is not None and inclusive]
    out += [math.nextafter(o.low, math.inf)] if o.low is not None else [-1e6]
    out += [math.nextafter(o.high, -math.inf)] if o.high is not None else [1e6]
    return out


def test_every_loss_option_of_the_table_is_covered():
    # the table must not grow a loss parameter this test does not hold to the spec
    assert {(m, n) for m, n in CASES} >= {("dpkd", "beta"), ("dpkd", "label_smoothing"), ("simpo", "gamma"),
                                           ("gkd", "beta"), ("akl", "mu"), ("ipo", "tau"), ("kd", "temperature")}


@pytest.mark.parametrize("method,name", CASES)
def test_the_table_refuses_what_the_spec_refuses(method, name):
    h = next(h for h in METHODS[method].hparams if h.name == name)
    for bad in _option(method, name).invalid_values():
        with pytest.raises(ValueError, match=name):
            h.check(method, bad)


@pytest.mark.parametrize("method,name", CASES)
def test_the_table_accepts_what_the_spec_accepts(method, name):
    h, o = next(h for h in METHODS[method].hparams if h.name == name), _option(method, name)
    for good in _valid_values(o) + [h.default]:
        assert h.check(method, good) == o.check(SPEC_FUNCTION[method], good, {})
