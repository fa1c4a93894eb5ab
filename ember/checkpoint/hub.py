"""Pushing a run to the Hugging Face Hub, with transformers' `hub_strategy` meanings.

`HubSync` owns one run's repo and its pushes. The Checkpointer asks it, at each save, whether
this save pushes (`plan_checkpoint_push`: not with hub_strategy="end", not while the previous push
runs unless hub_always_push), and hands the answer to the checkpoint write as its `on_commit`: so a
push starts only once the checkpoint folder is complete and renamed into place (a `.tmp` folder
is never pushed), on the thread that wrote it. What a save pushes:

- "every_save": the model files of the checkpoint (weights, config, tokenizer files,
  training_args.json; never optimizer, scheduler or RNG state) are copied to output_dir's root,
  and the root is uploaded without `_*`, `checkpoint-*` and ember's lock file;
- "checkpoint": that, then the whole checkpoint as `last-checkpoint/` (to resume from);
- "all_checkpoints": that, then the whole checkpoint in its own `checkpoint-N/` folder;
- "end": nothing during training; `push_to_hub()` pushes at the end.

Uploads run in the background on `HfApi.run_as_future`'s one worker thread, so they keep their
order and training never waits for the network. A checkpoint upload reads hard links of the
checkpoint's files (`output_dir/_hub/checkpoint-N/`, never pushed at the root), so rotation may
delete the checkpoint meanwhile. A failed push is logged as an error that says the local files are
whole, is kept in `failures`, and never stops training nor touches a checkpoint; the final blocking
push raises `HubPushError`. Only the main process pushes (the Checkpointer asks only there).

huggingface_hub is imported only when a push or a repo is asked for. The HfApi comes from the
factory given (`create_hub_api` of the object that runs the loop), which tests replace with a
recording subclass of the real `HfApi`: no Hub is reached in ember's tests.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

from ..args.hub import default_repo_name
from .atomic import verify_checkpoint
from .io import is_model_file
from .lock import LOCK_NAME

logger = logging.getLogger("ember")

#: Never uploaded from output_dir's root: transformers' patterns (private `_*` entries, checkpoint
#: folders; `checkpoint-*` also covers ember's `checkpoint-N.tmp`) and ember's lock file.
ROOT_IGNORE_PATTERNS = ("_*", "checkpoint-*", LOCK_NAME, "*.tmp")
#: Under output_dir: the hard-linked copy a checkpoint is uploaded from (a `_*` name: never pushed).
STAGING_DIR = "_hub"
CHECKPOINT_STRATEGIES = ("checkpoint", "all_checkpoints")


class HubPushError(RuntimeError):
    """The Hub could not be reached or refused a push; the local files are untouched."""


def default_hub_api() -> Any:
    from huggingface_hub import HfApi

    return HfApi()


class HubSync:
    """One run's Hub repo and its pushes (see the module docstring)."""

    def __init__(self, args: Any, api_factory: Callable[[], Any] = default_hub_api) -> None:
        self.args = args
        self._api_factory = api_factory
        self._api: Any = None
        self.repo_id: str | None = None
        self.failures: list[str] = []
        self._jobs: list[futures.Future[Any]] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # A trainer is copied to other processes (Ray Tune's workers): the copy starts with no
        # pushes in flight, its own lock, and an HfApi of its own.
        state = dict(self.__dict__)
        state.update(_api=None, _jobs=[], _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = self._api_factory()
        return self._api

    # -- the repo ----------------------------------------------------------------------------------
    def init_repo(self, token: str | None = None, private: bool | None = None) -> str:
        """Create the repo (or find it: exist_ok) and return its full id ('user/name')."""
        args = self.args
        name = args.hub_model_id or default_repo_name(args.output_dir)
        token = token if token is not None else args.hub_token
        private = private if private is not None else args.hub_private_repo
        try:
            url = self.api.create_repo(name, token=token, private=private, exist_ok=True)
        except Exception as exc:
            raise HubPushError(
                f"ember: could not create or reach the Hub repo {name!r} ({type(exc).__name__}: {exc}). "
                "Check the network and the token (hub_token, or `hf auth login`), or set push_to_hub=False "
                "and push output_dir later."
            ) from exc
        self.repo_id = str(url.repo_id)
        return self.repo_id

    # -- pushes at saves ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while a push has not finished."""
        with self._lock:
            return any(not job.done() for job in self._jobs)

    def plan_checkpoint_push(self, commit_message: str) -> Callable[[Path], None] | None:
        """What to run once this save's checkpoint is in place, or None when this save pushes nothing."""
        if self.args.hub_strategy == "end" or self.repo_id is None:
            return None
        if self.busy and not self.args.hub_always_push:
            logger.info("ember: the previous Hub push is still running; this save is not pushed.")
            return None
        return lambda folder: self.push_checkpoint(folder, commit_message)

    def push_checkpoint(self, folder: Path, commit_message: str) -> None:
        """Queue the pushes of the committed checkpoint `folder`. Never raises: a failure is reported."""
        output_dir = Path(self.args.output_dir)
        try:
            problem = verify_checkpoint(folder, deep=False)
            if problem is not None:
                raise HubPushError(f"{folder} is not a complete checkpoint ({problem})")
            copy_model_files(folder, output_dir)
            self._submit(
                f"the model of {folder.name}",
                folder_path=output_dir,
                commit_message=commit_message,
                ignore_patterns=list(ROOT_IGNORE_PATTERNS),
            )
            if self.args.hub_strategy in CHECKPOINT_STRATEGIES:
                last = self.args.hub_strategy == "checkpoint"
                staged = stage_folder(folder, output_dir / STAGING_DIR / folder.name)
                self._submit(
                    folder.name,
                    cleanup=staged,
                    folder_path=staged,
                    path_in_repo="last-checkpoint" if last else folder.name,
                    commit_message=commit_message + ", checkpoint",
                )
        except Exception as exc:
            self._report(folder.name, exc)

    def _submit(self, what: str, cleanup: Path | None = None, **upload: Any) -> futures.Future[Any]:
        api, repo_id = self.api, self.repo_id
        upload.setdefault("token", self.args.hub_token)
        upload.setdefault("revision", self.args.hub_revision)

        def job() -> Any:
            try:
                return api.upload_folder(repo_id=repo_id, **upload)
            except Exception as exc:
                self._report(what, exc)  # before the future completes, so wait() sees it recorded
                raise
            finally:
                if cleanup is not None:
                    shutil.rmtree(cleanup, ignore_errors=True)

        # HfApi runs these one at a time, in the order queued.
        future: futures.Future[Any] = api.run_as_future(job)
        with self._lock:
            self._jobs = [j for j in self._jobs if not j.done()] + [future]
        return future

    def _report(self, what: str, exc: BaseException) -> None:
        message = (
            f"ember: pushing {what} to the Hub repo {self.repo_id} failed ({type(exc).__name__}: {exc}). "
            f"The local files in {self.args.output_dir} are whole and training goes on; push them later "
            "with trainer.push_to_hub() or huggingface_hub's upload_folder."
        )
        with self._lock:
            self.failures.append(message)
        logger.error(message)

    def wait(self) -> None:
        """Block until every push in flight has finished (their failures are already reported)."""
        with self._lock:
            jobs = list(self._jobs)
        if any(not job.done() for job in jobs):
            logger.info("ember: waiting for the Hub push in flight to finish.")
        futures.wait(jobs)

    # -- the final push ----------------------------------------------------------------------------
    def push_output_dir(
        self, commit_message: str | None, blocking: bool, token: str | None, revision: str | None
    ) -> Any:
        """Upload output_dir's root (the saved model, README.md; no checkpoint folders) after the
        pushes in flight. Blocking: the `CommitInfo`, or `HubPushError`; else the `Future`."""
        self.wait()
        folder = self.args.output_dir
        upload: dict[str, Any] = {
            "folder_path": folder,
            "commit_message": commit_message,
            "token": token if token is not None else self.args.hub_token,
            "revision": revision,
            "ignore_patterns": list(ROOT_IGNORE_PATTERNS),
        }
        if not blocking:
            return self._submit(f"{folder}", **upload)
        try:
            return self.api.upload_folder(repo_id=self.repo_id, **upload)
        except Exception as exc:
            raise HubPushError(
                f"ember: pushing {folder} to the Hub repo {self.repo_id} failed ({type(exc).__name__}: "
                f"{exc}). The model is saved locally in {folder}; call trainer.push_to_hub() again when "
                "the Hub is reachable."
            ) from exc


def copy_model_files(checkpoint: Path, output_dir: Path) -> list[str]:
    """Copy the model files of `checkpoint` (never its resume state) to `output_dir`'s root; each file
    is replaced in one rename, so an upload reading the previous one never sees half a file."""
    copied = []
    for entry in sorted(checkpoint.iterdir()):
        if not is_model_file(entry.name):
            continue
        target = output_dir / entry.name
        if entry.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(entry, target)
        else:
            partial = output_dir / f"_{entry.name}.partial"
            shutil.copyfile(entry, partial)
            os.replace(partial, target)
        copied.append(entry.name)
    return copied


def stage_folder(source: Path, staged: Path) -> Path:
    """`staged`, holding hard links to every file of `source` (copies across file systems)."""
    shutil.rmtree(staged, ignore_errors=True)
    for path in sorted(source.rglob("*")):
        target = staged / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    return staged
