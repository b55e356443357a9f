"""Selective prediction: risk-coverage curves and AURC (Geifman & El-Yaniv)."""

from __future__ import annotations

import numpy as np
import pytest

from carddeck.eval.robustness import risk_coverage


def test_aurc_rewards_a_risk_that_ranks_the_errors_last():
    wrong = np.array([0, 0, 0, 1, 0, 1, 0, 0, 1, 0], bool)
    oracle = risk_coverage(wrong.astype(float), wrong)
    reversed_ = risk_coverage(1 - wrong.astype(float), wrong)
    blind = risk_coverage(np.zeros(10), wrong)
    assert oracle["aurc"] < blind["aurc"] < reversed_["aurc"]
    # answered least risky first: no error until the 7 right ones are in; all answered = the error rate
    assert oracle["risk"][0] == 0.0 and oracle["risk"][-1] == pytest.approx(0.3) == blind["risk"][-1]
    # the exact area: mean over k of errors among the first k (oracle: 0 x7, then 1/8, 2/9, 3/10)
    assert oracle["aurc"] == pytest.approx((1 / 8 + 2 / 9 + 3 / 10) / 10)
    assert oracle["coverage"][0] == pytest.approx(0.1) and oracle["coverage"][-1] == 1.0
