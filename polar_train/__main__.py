"""``python -m polar_train`` (what ``torchrun -m polar_train`` runs)."""

from polar_train.cli import entry

entry()
