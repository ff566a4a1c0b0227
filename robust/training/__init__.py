"""Training: :class:`robust.training.module.AdversarialClassifier` (the training mix and validation on the threat
suite) and the callbacks and helpers ``train.py`` wires around it: the run record (card, RNG, resume), checkpoints,
the overfitting guard, weight averaging, schedules, progress lines and resume checks. Imports Lightning."""
