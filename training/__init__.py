"""Training service: datasets, the article's EfficientNet training, evaluation, export, registry.

Entry points: ``python -m training`` (:mod:`training.cli`) and the Kafka training worker
(:mod:`training.worker`). See ``training/README.md``.
"""
