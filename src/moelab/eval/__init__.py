"""Evaluation: per-domain loss and perplexity on the shipped corpus."""

from moelab.eval.perplexity import DomainLoss, domain_losses

__all__ = ["DomainLoss", "domain_losses"]
