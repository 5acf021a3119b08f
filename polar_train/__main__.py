"""``python -m polar_train`` (what ``torchrun -m polar_train`` runs)."""

import sys

from polar_train.cli import main

sys.exit(main())
