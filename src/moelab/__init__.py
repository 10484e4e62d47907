"""moelab: Mixture-of-Experts transformers — build, train, inspect and compress."""

__version__ = "0.1.0"
