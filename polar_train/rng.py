"""This process's random number generators as tensors: what a checkpoint saves per rank, in
safetensors (no pickle). Python's and numpy's Mersenne Twister words are stored as int64."""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch


def rng_state() -> dict[str, torch.Tensor]:
    """Every RNG this process has, as tensors (Python's and numpy's Mersenne Twister words as int64)."""
    import numpy as np

    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, np_gauss = np.random.get_state()
    assert (version, kind) == (3, "MT19937"), (version, kind)
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([*words, -1 if gauss is None else 0], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss or 0.0], dtype=torch.float64),
        "numpy": torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    *words, no_gauss = state["python"].tolist()
    random.setstate((3, tuple(words), None if no_gauss == -1 else float(state["python_gauss"][0])))
    *keys, pos, has_gauss = state["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, float(state["numpy_gauss"][0])))


def seed_rng(seed: int) -> None:
    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
