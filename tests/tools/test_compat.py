"""`make compat`'s report: what moved upstream, and whether ember follows it."""

from __future__ import annotations

import copy

from tools.compat import surface_report
from tools.surface import surface


def test_surface_of_the_locked_transformers_and_of_ember() -> None:
    theirs, ours = surface("transformers"), surface("ember")
    # 5.25's resume hook, with its parameter names, on both sides.
    assert theirs["trainer"]["get_resumed_dataloader"] == ["dataloader", "num_batches"]
    assert ours["trainer"]["get_resumed_dataloader"] == ["dataloader", "num_batches"]
    assert theirs["training_args"]["learning_rate"] == ours["training_args"]["learning_rate"] == "5e-05"
    assert "on_step_end" in theirs["callback_events"]


def test_report_lists_new_members_changed_defaults_and_what_ember_lacks() -> None:
    newest = {"versions": {"transformers": "5.25.0"}, "transformers": surface("transformers")}
    newest["ember"] = copy.deepcopy(newest["transformers"])
    locked = {"versions": {"transformers": "5.24.0"}, "transformers": copy.deepcopy(newest["transformers"])}
    del locked["transformers"]["trainer"]["get_resumed_dataloader"]
    locked["transformers"]["training_args"]["warmup_steps"] = "17"
    newest["transformers"]["training_args"]["brand_new_field"] = "None"
    lines = "\n".join(surface_report(locked, newest))
    assert "transformers: 5.24.0 -> 5.25.0  (changed)" in lines
    assert "+ get_resumed_dataloader ['dataloader', 'num_batches']  (ember has it)" in lines
    assert "+ brand_new_field None  (ember LACKS it)" in lines
    assert f"~ warmup_steps: 17 -> {newest['transformers']['training_args']['warmup_steps']}" in lines


def test_report_says_so_when_nothing_moved() -> None:
    same = {"versions": {"transformers": "5.25.0"}, "transformers": surface("transformers")}
    same["ember"] = surface("ember")
    assert surface_report(same, same)[-1] == "surface: no change between the locked and the newest releases"
