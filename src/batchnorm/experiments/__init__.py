"""Classic normalization experiments, each a small config driving one shared training loop.

``batchnorm experiment list`` names them; :mod:`batchnorm.experiments.registry` maps a
name to its :class:`~batchnorm.experiments.base.Experiment`.
"""
