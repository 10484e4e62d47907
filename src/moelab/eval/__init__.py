"""Evaluation: per-domain loss and perplexity on the shipped corpus; `evaluate` compares a
(compressed) checkpoint with its base."""

from moelab.eval.evaluate import EvalOptions, evaluate, parameter_counts
from moelab.eval.perplexity import DomainLoss, domain_losses

__all__ = ["DomainLoss", "EvalOptions", "domain_losses", "evaluate", "parameter_counts"]
