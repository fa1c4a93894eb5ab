from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ember.checkpoint import capture_rng_state, load_state, restore_rng_state, save_state


def draw() -> tuple[list[float], list[float], list[float], float]:
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        np.random.standard_normal(),  # exercises numpy's cached-gaussian slot
    )


def test_capture_save_load_restore_reproduces_draws(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw()
    np.random.standard_normal()  # leave a cached gaussian in the numpy state
    state = capture_rng_state()
    assert set(state) >= {"python", "numpy", "cpu"}
    save_state({"rng": state}, tmp_path, "rng_state")
    expected = draw()
    draw()  # move every generator further on
    restore_rng_state(load_state(tmp_path, "rng_state")["rng"])
    assert draw() == expected


def test_restore_accepts_lists_for_tuples() -> None:
    state = capture_rng_state()
    expected = draw()
    state["python"] = list(state["python"])
    state["python"][1] = list(state["python"][1])
    state["numpy"] = list(state["numpy"])
    restore_rng_state(state)
    assert draw() == expected
