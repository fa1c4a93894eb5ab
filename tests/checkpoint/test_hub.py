"""Pushing to the Hugging Face Hub (ember/checkpoint/hub.py), tested at the `HfApi` boundary.

No Hub is reachable from the tests: `RecordingHfApi` is a subclass of the real `huggingface_hub.HfApi`
whose network calls (`create_repo`, `upload_folder`, `create_commit`) are answered here. It records
each call, selects files with huggingface_hub's own `filter_repo_objects` (the rule `upload_folder`
applies) and writes what a commit adds under `remote/<repo_id>/`, so the tests read what would be in
the repo. Its `run_as_future` and thread pool are HfApi's own.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, RepoUrl
from huggingface_hub.hf_api import future_compatible
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import (
    DEFAULT_IGNORE_PATTERNS,
    HFValidationError,
    filter_repo_objects,
    validate_repo_id,
)

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.args.hub import repo_name_problem
from ember.checkpoint.atomic import verify_checkpoint
from ember.checkpoint.hub import HubPushError
from tests.helpers import lm_examples, pad_lm_batch, tiny_gpt2

RESUME_ONLY = ("optimizer.safetensors", "trainer.safetensors", "rank-0.safetensors", "manifest.json")


class RecordingHfApi(HfApi):
    def __init__(self, remote: Path, user: str = "tester", fail: str | None = None) -> None:
        super().__init__(endpoint="https://hub.invalid")
        self.remote, self.user, self.fail = remote, user, fail
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.gate: threading.Event | None = None  # when set up, commits wait for it

    def create_repo(self, repo_id: str, **kwargs: Any) -> RepoUrl:  # type: ignore[override]
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if self.fail == "create_repo":
            raise ConnectionError("Hub unreachable (simulated)")
        full = repo_id if "/" in repo_id else f"{self.user}/{repo_id}"
        return RepoUrl(f"https://huggingface.co/{full}")

    @future_compatible
    def upload_folder(  # type: ignore[override]
        self,
        *,
        repo_id: str,
        folder_path: str | Path,
        path_in_repo: str | None = None,
        commit_message: str | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        run_as_future: bool = False,
    ) -> CommitInfo:
        call = {"repo_id": repo_id, "folder_path": Path(folder_path), "path_in_repo": path_in_repo}
        call.update(commit_message=commit_message, token=token, revision=revision)
        self.calls.append(("upload_folder", call))
        root = Path(folder_path).resolve()
        files = {p.relative_to(root).as_posix(): p for p in sorted(root.glob("**/*")) if p.is_file()}
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        kept = filter_repo_objects(
            files, allow_patterns=allow_patterns, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS
        )
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        ops = [CommitOperationAdd(path_in_repo=prefix + rel, path_or_fileobj=str(files[rel])) for rel in kept]
        return self.create_commit(
            repo_id=repo_id, operations=ops, commit_message=commit_message or "", revision=revision
        )

    def create_commit(
        self, repo_id: str, operations: Any, *, commit_message: str, revision: str | None = None, **_: Any
    ) -> CommitInfo:  # type: ignore[override]  # noqa: E501
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        paths = [op.path_in_repo for op in operations]
        self.calls.append(
            ("create_commit", {"repo_id": repo_id, "paths": paths, "commit_message": commit_message})
        )
        if self.fail == "commit":
            raise ConnectionError("Hub unreachable (simulated)")
        for op in operations:
            target = self.remote / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        url = f"https://huggingface.co/{repo_id}/commit/{len(self.calls):040d}"
        return CommitInfo(
            commit_url=url,
            commit_message=commit_message,
            commit_description="",
            oid=f"{len(self.calls):040d}",
        )

    def uploads(self) -> list[dict[str, Any]]:
        return [c for name, c in self.calls if name == "upload_folder"]

    def commits(self) -> list[dict[str, Any]]:
        return [c for name, c in self.calls if name == "create_commit"]


class HubTrainer(Trainer):
    api: RecordingHfApi

    def create_hub_api(self) -> Any:
        return self.api


def _train(
    tmp_path: Path, api: RecordingHfApi, callbacks: Any = None, resume: bool | None = None, **kw: Any
) -> HubTrainer:
    fields: dict[str, Any] = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4, save_steps=2,
        report_to="none", disable_tqdm=True, use_cpu=True, push_to_hub=True, logging_steps=2,
    )  # fmt: skip
    fields.update(kw)
    HubTrainer.api = api
    trainer = HubTrainer(
        tiny_gpt2(0), TrainingArguments(**fields), train_dataset=lm_examples(16),
        data_collator=pad_lm_batch, callbacks=callbacks,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def api(tmp_path: Path) -> RecordingHfApi:
    return RecordingHfApi(tmp_path / "remote")


def test_every_save_pushes_the_model_at_the_root_then_the_final_push_at_the_end(tmp_path, api) -> None:
    trainer = _train(tmp_path, api, hub_private_repo=True, hub_token="secret-token", hub_always_push=True)
    (name, create), *_ = api.calls
    assert name == "create_repo" and create["repo_id"] == "run" and create["private"] is True
    assert create["exist_ok"] is True and create["token"] == "secret-token"
    assert trainer.hub_model_id == "tester/run"
    pushes = api.uploads()
    assert [p["commit_message"] for p in pushes] == [
        "Training in progress, step 2",
        "Training in progress, step 4",
    ]
    assert all(p["path_in_repo"] is None and p["token"] == "secret-token" for p in pushes)
    repo = tmp_path / "remote" / "tester/run"
    pushed = _files(repo)
    assert {"config.json", "model.safetensors", "generation_config.json", "training_args.json"} <= pushed
    # Never the resume state, the checkpoint folders, ember's lock or staging folder.
    assert not any(p.startswith(("checkpoint-", "_", ".ember")) or p in RESUME_ONLY for p in pushed), pushed
    assert "trainer_state.json" not in pushed
    assert "secret-token" not in (repo / "training_args.json").read_text()  # masked as transformers does
    # The root model is step 4's.
    assert (repo / "model.safetensors").read_bytes() == (
        tmp_path / "run/checkpoint-4/model.safetensors"
    ).read_bytes()

    trainer.push_to_hub(dataset="tiny-lm")
    final = api.uploads()[-1]
    assert final["commit_message"] == "End of training" and len(api.uploads()) == 3
    card = (repo / "README.md").read_text()
    assert "tiny-lm" in card and "learning_rate" in card
    assert metadata_load(repo / "README.md")["datasets"] == ["tiny-lm"]  # the front matter is valid YAML


def test_checkpoint_strategy_pushes_the_newest_complete_checkpoint_as_last_checkpoint(tmp_path, api) -> None:
    # hub_always_push: step 2's push may still run when step 4 saves (the order is what is tested).
    _train(tmp_path, api, hub_strategy="checkpoint", save_async=True, hub_always_push=True)
    pushes = api.uploads()
    assert [(p["path_in_repo"], p["commit_message"]) for p in pushes] == [
        (None, "Training in progress, step 2"),
        ("last-checkpoint", "Training in progress, step 2, checkpoint"),
        (None, "Training in progress, step 4"),
        ("last-checkpoint", "Training in progress, step 4, checkpoint"),
    ]
    last = tmp_path / "remote/tester/run/last-checkpoint"
    assert verify_checkpoint(last, deep=True) is None  # whole, with the resume state
    assert '"global_step": 4' in (last / "trainer_state.json").read_text()
    assert not (tmp_path / "run/_hub").exists() or not any((tmp_path / "run/_hub").iterdir())


def test_all_checkpoints_pushes_each_in_its_folder_even_when_rotation_deletes_it(tmp_path, api) -> None:
    _train(tmp_path, api, hub_strategy="all_checkpoints", save_total_limit=1, hub_always_push=True)
    assert [p["path_in_repo"] for p in api.uploads()] == [None, "checkpoint-2", None, "checkpoint-4"]
    repo = tmp_path / "remote/tester/run"
    for step in (2, 4):
        assert verify_checkpoint(repo / f"checkpoint-{step}", deep=True) is None
    assert not (tmp_path / "run/checkpoint-2").exists()  # rotated away locally, pushed whole


def test_end_strategy_pushes_nothing_until_push_to_hub(tmp_path, api) -> None:
    trainer = _train(tmp_path, api, hub_strategy="end", hub_model_id="org/named", hub_revision="dev")
    assert api.uploads() == []
    trainer.push_to_hub()
    (push,) = api.uploads()
    assert push["repo_id"] == "org/named" and push["revision"] == "dev"
    assert "model.safetensors" in _files(tmp_path / "remote/org/named")


def test_save_model_pushes_when_push_to_hub_is_set(tmp_path, api) -> None:
    trainer = _train(tmp_path, api, hub_strategy="end")
    trainer.save_model()
    assert [p["commit_message"] for p in api.uploads()] == ["Model save"]


class _OpenGateOnLastSave(TrainerCallback):
    def __init__(self, api: RecordingHfApi) -> None:
        self.api = api

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            assert self.api.gate is not None
            self.api.gate.set()


@pytest.mark.parametrize("always", [False, True])
def test_a_save_during_a_running_push_is_skipped_unless_hub_always_push(tmp_path, api, always) -> None:
    api.gate = threading.Event()  # step 2's push is still running when step 4 saves
    _train(tmp_path, api, callbacks=[_OpenGateOnLastSave(api)], hub_always_push=always)
    messages = [p["commit_message"] for p in api.uploads()]
    expected = ["Training in progress, step 2"] + (["Training in progress, step 4"] if always else [])
    assert messages == expected


def test_a_failing_hub_leaves_the_local_checkpoints_whole_and_says_so(tmp_path, caplog) -> None:
    api = RecordingHfApi(tmp_path / "remote", fail="commit")
    with caplog.at_level(logging.ERROR, logger="ember"):
        trainer = _train(tmp_path, api, hub_strategy="checkpoint", hub_always_push=True)
    assert trainer.state.global_step == 4  # training went on
    for step in (2, 4):
        assert verify_checkpoint(tmp_path / f"run/checkpoint-{step}", deep=True) is None
    assert len(trainer.hub.failures) == 4
    assert "Hub unreachable" in caplog.text and "local files" in caplog.text and "whole" in caplog.text
    with pytest.raises(HubPushError, match="saved locally"):
        trainer.push_to_hub()
    assert (tmp_path / "run/model.safetensors").exists()
    # The run resumes from the checkpoint the Hub never got.
    resumed = _train(tmp_path, RecordingHfApi(tmp_path / "remote2"), resume=True, max_steps=6)
    assert resumed.state.global_step == 6


def test_an_unreachable_hub_at_construction_names_the_repo(tmp_path) -> None:
    api = RecordingHfApi(tmp_path / "remote", fail="create_repo")
    HubTrainer.api = api
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), push_to_hub=True, use_cpu=True, report_to="none"
    )
    with pytest.raises(HubPushError, match="'run'.*Hub unreachable"):
        HubTrainer(tiny_gpt2(0), args, train_dataset=lm_examples(4), data_collator=pad_lm_batch)


# -- the arguments -------------------------------------------------------------------------------------


def test_bad_hub_values_are_refused_naming_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match="`hub_strategy`='sometimes'.*every_save"):
        TrainingArguments(output_dir=str(tmp_path), hub_strategy="sometimes")
    with pytest.raises(ValueError, match="`hub_model_id`='a/b/c'"):
        TrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="a/b/c")
    with pytest.raises(ValueError, match="output_dir.*'bad name'.*hub_model_id"):
        TrainingArguments(output_dir=str(tmp_path / "bad name"), push_to_hub=True)
    # Without push_to_hub, output_dir's name does not matter.
    TrainingArguments(output_dir=str(tmp_path / "bad name"))


def test_transformers_hub_strategy_enum_and_masked_token_are_read() -> None:
    from transformers.trainer_utils import HubStrategy

    args = TrainingArguments(
        output_dir="x", hub_strategy=HubStrategy.ALL_CHECKPOINTS, hub_token="<HUB_TOKEN>"
    )
    assert args.hub_strategy == "all_checkpoints" and args.hub_token is None


@pytest.mark.parametrize(
    "name",
    [
        "model",
        "me/model",
        "my-org/m.v2_x",
        "a--b",
        "a..b",
        "-a",
        "a-",
        "x" * 97,
        "a/b/c",
        "bad name",
        "m.git",
        "é",
    ],
)
def test_repo_names_follow_the_hubs_rule(name: str) -> None:
    try:
        validate_repo_id(name)
        valid = True
    except HFValidationError:
        valid = False
    assert (repo_name_problem(name) is None) == valid


def test_the_hub_state_of_a_trainer_survives_a_copy_to_another_process(tmp_path) -> None:
    # Ray Tune pickles the trainer for its workers; the copy gets its own lock and no pushes in flight.
    import pickle

    from ember.checkpoint.hub import HubSync

    sync = HubSync(TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    sync.failures.append("an earlier push failed")
    copy = pickle.loads(pickle.dumps(sync))
    assert copy.failures == ["an earlier push failed"]
    with copy._lock:  # a working lock of its own
        assert copy._lock is not sync._lock
