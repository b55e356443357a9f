"""Robustness evaluation of a deck: every card, the uniform deck, each gate policy and the oracle."""

from carddeck.eval.robustness import EvalResult, collect_runs, conditions_for, evaluate, fit_router_on

__all__ = ["EvalResult", "collect_runs", "conditions_for", "evaluate", "fit_router_on"]
