"""Trackers (``report_to`` backends) and other integrations.

`TRACKERS` is the registry: each name maps to the callback class that logs to that backend, as a
``"module:ClassName"`` string, and to the packages it needs. Nothing here imports a tracker
library: `Tracker.is_available` only asks the import system whether the package could be found,
and the class is imported when a Trainer is built with that name in ``report_to``.

Adding a tracker is one new file in this folder (a `TrainerCallback` that writes on the world
process zero only) and one line in `TRACKERS`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SUMMARY_KEYS",
    "TRACKERS",
    "TRACKER_NAMES",
    "JsonlLoggerCallback",
    "Tracker",
    "TrackerNotInstalledError",
    "available_trackers",
    "model_config_dict",
    "rewrite_logs",
    "scalar_value",
    "run_config",
]


class TrackerNotInstalledError(ImportError):
    """A backend named in ``report_to`` whose package is not installed."""


@dataclass(frozen=True)
class Tracker:
    """One ``report_to`` backend: where its callback lives and what it needs installed."""

    name: str
    target: str  # "package.module:ClassName" of the callback
    requires: tuple[str, ...] = ()  # top-level modules the callback imports
    pip: str = ""  # what to `pip install` when they are missing

    def is_available(self) -> bool:
        """Whether every required package can be imported, without importing any of them."""
        return all(_findable(module) for module in self.requires)

    def load(self) -> type[Any]:
        """The callback class; a missing package is a `TrackerNotInstalledError` saying what to install."""
        missing = [module for module in self.requires if not _findable(module)]
        module_name, _, class_name = self.target.partition(":")
        try:
            if missing:
                raise ModuleNotFoundError(f"No module named {missing[0]!r}", name=missing[0])
            return getattr(importlib.import_module(module_name), class_name)  # type: ignore[no-any-return]
        except ImportError as err:
            raise TrackerNotInstalledError(
                f"report_to={self.name!r} needs the `{self.pip}` package, which could not be imported "
                f"({err}). Install it with `pip install {self.pip}` (or `pip install 'ember[trackers]'` "
                f"for every tracker), or remove {self.name!r} from `report_to`."
            ) from err


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or a module without a spec
        return False


_HERE = "ember.integrations"
# One line per tracker. "requires" are import names, "pip" the package to install when one is missing.
# fmt: off
TRACKERS: dict[str, Tracker] = {t.name: t for t in (
    Tracker("jsonl", f"{_HERE}.jsonl:JsonlLoggerCallback"),
    Tracker("tensorboard", f"{_HERE}.tensorboard:TensorBoardCallback", ("tensorboard",), "tensorboard"),
    Tracker("wandb", f"{_HERE}.wandb:WandbCallback", ("wandb",), "wandb"),
    Tracker("mlflow", f"{_HERE}.mlflow:MLflowCallback", ("mlflow",), "mlflow"),
    Tracker("trackio", f"{_HERE}.trackio:TrackioCallback", ("trackio",), "trackio"),
)}
# fmt: on
TRACKER_NAMES: tuple[str, ...] = tuple(TRACKERS)


def available_trackers() -> list[str]:
    """The names ``report_to="all"`` stands for: jsonl plus every backend whose package is installed."""
    return [name for name, tracker in TRACKERS.items() if tracker.is_available()]


# End-of-training numbers, one value per run: trackers with a run summary put them there, not in charts.
SUMMARY_KEYS = frozenset(
    {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos"}
)


def rewrite_logs(logs: dict[str, Any]) -> dict[str, Any]:
    """Log keys in the ``section/name`` form dashboards group by: ``eval_loss`` -> ``eval/loss``,
    ``test_acc`` -> ``test/acc``, anything else -> ``train/<key>`` (the names transformers' trackers use)."""
    out: dict[str, Any] = {}
    for key, value in logs.items():
        section, sep, rest = key.partition("_")
        if sep and section in ("eval", "test"):
            out[f"{section}/{rest}"] = value
        else:
            out[f"train/{key}"] = value
    return out


def model_config_dict(model: Any) -> dict[str, Any]:
    """``model.config`` as a dict (a transformers config or a plain dict), or {} for a model without one."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}


def run_config(args: Any, model: Any, with_num_parameters: bool = False) -> dict[str, Any]:
    """What trackers record as the run's hyperparameters: the model config overlaid by the arguments
    (and, with `with_num_parameters`, ``model/num_parameters`` as wandb and trackio chart it)."""
    to_dict = getattr(args, "to_dict", None)
    config = {**model_config_dict(model), **(to_dict() if callable(to_dict) else vars(args))}
    if with_num_parameters and model is not None:
        from ..utils import count_parameters  # torch: not at import, ember.args imports this module

        config["model/num_parameters"] = count_parameters(model)
    return config


def scalar_value(value: Any) -> float | None:
    """A log value as a float: Python numbers and 0-d numpy/torch scalars; None for anything else."""
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        result = item()
        return float(result) if isinstance(result, (int, float)) else None
    return None


def __getattr__(name: str) -> Any:
    # Lazily, and by the registry's name like every tracker: jsonl imports ember.callbacks, which
    # imports (and types its events with) ember.args, which imports this registry.
    if name == "JsonlLoggerCallback":
        return TRACKERS["jsonl"].load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
