"""Runnable examples: ``python -m batchnorm.examples.<name>``."""
