"""Checks of the Hub fields (`push_to_hub`, `hub_*`), run when the arguments are built, so a push
that could never start fails before any training. No huggingface_hub import here: the repo-name
rule is the Hub's own, written out (checked against `huggingface_hub.utils.validate_repo_id` in the
tests)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: transformers' `HubStrategy` values, with its meanings (ember/checkpoint/hub.py does the pushing).
HUB_STRATEGIES: tuple[str, ...] = ("end", "every_save", "checkpoint", "all_checkpoints")

# What transformers' (and ember's) `to_dict()` writes in place of a token, so a saved training_args.json
# never holds it; reading such a file back means "no token given".
MASKED_TOKEN = "<HUB_TOKEN>"

# One path segment of a repo id as the Hub accepts it: letters, digits, '-', '_', '.', at most 96,
# neither starting nor ending with '-' or '.', no '--' or '..', not ending in '.git'.
_SEGMENT = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9_](?:[\w.\-]{0,94}[A-Za-z0-9_])?$")


def repo_name_problem(repo_id: str) -> str | None:
    """None when `repo_id` ('name' or 'owner/name') is a valid Hub repo id, else why not."""
    parts = repo_id.split("/")
    if len(parts) > 2:
        return "it has more than one '/' (use 'name' or 'owner/name')"
    for part in parts:
        if not _SEGMENT.match(part) or part.endswith(".git"):
            return (
                f"{part!r} is not a valid repo name (letters, digits, '-', '_' and '.', at most 96, "
                "not starting or ending with '-' or '.', no '--' or '..')"
            )
    return None


def default_repo_name(output_dir: str) -> str:
    """transformers' default `hub_model_id`: the name of output_dir's folder (under the token's user)."""
    return Path(output_dir).absolute().name


def check_hub_args(args: Any) -> None:
    if args.hub_token == MASKED_TOKEN:
        args.hub_token = None
    if args.hub_strategy not in HUB_STRATEGIES:
        raise ValueError(
            f"`hub_strategy`={args.hub_strategy!r} is not a hub strategy; use one of "
            f"{', '.join(map(repr, HUB_STRATEGIES))} (transformers' HubStrategy values)."
        )
    if not args.push_to_hub:
        return
    if args.hub_model_id is not None:
        problem = repo_name_problem(args.hub_model_id)
        if problem:
            raise ValueError(f"`hub_model_id`={args.hub_model_id!r} cannot name a Hub repo: {problem}.")
        return
    name = default_repo_name(args.output_dir)
    problem = repo_name_problem(name) if name else "the folder has no name"
    if problem:
        raise ValueError(
            f"push_to_hub=True names the Hub repo after `output_dir`'s folder ({name!r}), which cannot "
            f"name a repo: {problem}. Set `hub_model_id` (e.g. 'my-model' or 'my-org/my-model')."
        )
