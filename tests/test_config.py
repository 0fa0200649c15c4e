"""NVConfig and Knobs: validation, the group-key resolution rule, and a strict round trip."""

import math

import pytest

from nvformer import IDENTITY, Knobs, NVConfig
from nvformer.config import group_key, is_module_key


def test_identity_and_knob_order():
    assert IDENTITY == Knobs(alpha_tau=1e4, stdev_tau=0.0, mu_tau=1.0)
    assert list(Knobs().as_dict()) == ["alpha_tau", "stdev_tau", "mu_tau"]
    k = Knobs(alpha_tau=2, stdev_tau=0.1).replace(mu_tau=0.5, alpha_tau=None)
    assert k == Knobs(2.0, 0.1, 0.5) and isinstance(k.alpha_tau, float)


@pytest.mark.parametrize("bad", [dict(stdev_tau=-0.1), dict(alpha_tau=math.nan), dict(mu_tau=math.inf), dict(alpha_tau="x"), dict(alpha_tau=True)])
def test_knobs_reject_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Knobs(**bad)


def test_most_specific_group_key_wins():
    cfg = NVConfig(knobs={"*": Knobs(1.0), "encoder": Knobs(2.0), "encoder.3": Knobs(3.0), "model.layer.7.attn": Knobs(4.0)})
    assert cfg.knobs_for("encoder", 3).alpha_tau == 3.0
    assert cfg.knobs_for("encoder", 2).alpha_tau == 2.0
    assert cfg.knobs_for("decoder", 3).alpha_tau == 1.0
    assert cfg.knobs_for("encoder", 3, "model.layer.7.attn").alpha_tau == 4.0
    assert NVConfig(knobs={"decoder": Knobs(5.0)}).knobs_for("encoder", 0) == IDENTITY
    assert NVConfig(knobs={"decoder": Knobs(5.0)}).lookup("encoder", 0) is None
    assert group_key("encoder", 3) == "encoder.3" and group_key("cross", None) == "cross"
    assert [is_module_key(k) for k in ("*", "cross", "decoder.11", "encoder.x", "bert.encoder")] == [False, False, False, True, True]


def test_with_knobs_changes_the_default_setting():
    cfg = NVConfig().with_knobs(alpha_tau=-1.0)
    assert cfg.knobs == {"*": IDENTITY.replace(alpha_tau=-1.0)}
    cfg2 = cfg.with_knobs({"encoder.0": Knobs(0.0)})
    assert cfg2.knobs == {"encoder.0": Knobs(0.0)} and cfg.knobs["*"].alpha_tau == -1.0


def test_round_trip_and_strict_from_dict():
    cfg = NVConfig(sites=("encoder", "cross"), formula="exact", delta=0.5, alpha_threshold=0.1, threshold_mode="relative",
                   knobs={"*": Knobs(3.0, 0.2, 0.9), "cross": Knobs(-1.0)})
    assert NVConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict()
    with pytest.raises(ValueError, match="unknown field"):
        NVConfig.from_dict({**d, "temperature": 1.0})
    with pytest.raises(ValueError, match="unknown knob"):
        NVConfig.from_dict({**d, "knobs": {"*": {"alpha": 1.0}}})
    with pytest.raises(ValueError, match="stdev_tau"):
        NVConfig.from_dict({**d, "knobs": {"*": {"stdev_tau": -1.0}}})
    with pytest.raises(ValueError, match="finite"):
        NVConfig.from_dict({**d, "knobs": {"*": {"alpha_tau": math.nan}}})


@pytest.mark.parametrize("bad, match", [
    (dict(sites=("encoder", "attention")), "unknown or no site"),
    (dict(sites=()), "unknown or no site"),
    (dict(formula="approximate"), "formula"),
    (dict(kappa=0), "kappa"),
    (dict(delta=-1.0), "delta"),
    (dict(alpha_threshold=0.0), "alpha_threshold"),
    (dict(threshold_mode="percent"), "threshold_mode"),
    (dict(min_var=0.0), "min_var"),
    (dict(knobs={"encoder..1": Knobs()}), "knob group"),
])
def test_config_rejects_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        NVConfig(**bad)
