"""A failing rank ends the job quickly and by name (issue 22): every rank's log says which rank
failed, where (step and phase) and why (its exception's first line), for an exception on one rank
only and for a rank that hangs; under torchrun and with processes started by hand. And a job that
torchrun restarts after a rank is killed resumes by itself and ends equal to an uninterrupted run."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ember.checkpoint import is_complete_checkpoint, verify_checkpoint
from tests.strategy import launch
from tests.strategy.launch import REPO, free_port, rank_env

WORKER = ["-m", "tests.strategy.fault_worker"]


def _by_hand(name: str, out: Path) -> list[launch.Rank]:
    return launch.run([*WORKER, name, str(out)], timeout=150)


def _torchrun(name: str, out: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    environ = rank_env(0, 1, free_port(), env)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(key)  # torchrun sets them
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", *extra,
        *WORKER, name, str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=environ, cwd=REPO, capture_output=True, text=True, timeout=240)
    return done.returncode, done.stdout + done.stderr


def _ended_after(output: str, rank: int) -> float:
    found = re.findall(rf"rank {rank}: train\(\) ended after ([0-9.]+)s", output)
    assert found, output[-3000:]
    return float(found[-1])


SAID = {
    "callback": "rank 1 failed while in the on_step_end callbacks of step 3: "
    "RuntimeError: boom in a callback",
    "collator": "rank 1 failed while loading the batches of step 3 (the dataset or the collator): "
    "ValueError: row 5 has no input_ids",
    "metrics": "rank 0 failed while logging, evaluating or saving after step 2: "
    "KeyError: 'accuracy needs labels'",
    "oom": "rank 1 failed while in the forward/backward/optimizer of step 2: "
    "OutOfMemoryError: CUDA out of memory",
}


@pytest.mark.parametrize("name", sorted(SAID))
def test_an_exception_on_one_rank_is_named_on_every_rank(tmp_path, name):
    ranks = _by_hand(name, tmp_path)
    said = SAID[name]
    for rank in ranks:
        assert rank.returncode not in (0, None), rank.output[-3000:]
        assert said in rank.output, f"rank {rank.rank}:\n{rank.output[-3000:]}"
        assert "second line" not in rank.output.split(said, 1)[1].split("\n", 1)[0]
    failing = int(said.split()[1])
    survivor = ranks[1 - failing]
    assert f"ember: rank {survivor.rank}: stopping because {said}" in survivor.output
    # ddp_timeout is 600 s: the survivor stops within seconds of the failure, not at the timeout.
    assert _ended_after(survivor.output, survivor.rank) < 60


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("hang-callback", "in the on_step_end callbacks of step 3"),
        ("hang-collator", "loading the batches of step 3 (the dataset or the collator)"),
    ],
)
def test_a_rank_that_hangs_is_named_after_peer_stall_timeout_not_ddp_timeout(tmp_path, name, where):
    ranks = _by_hand(name, tmp_path)
    said = f"rank 1 stopped progressing: it has been {where} for"
    for rank in ranks:
        assert rank.returncode not in (0, None), rank.output[-3000:]
        assert said in rank.output, f"rank {rank.rank}:\n{rank.output[-3000:]}"
    # The stuck rank shows where it hangs (its threads' stacks), then exits.
    assert "Its threads' stacks" in ranks[1].output and "fault_worker.py" in ranks[1].output
    assert "ember: rank 0: stopping because rank 1 stopped progressing" in ranks[0].output
    assert _ended_after(ranks[0].output, 0) < 60  # peer_stall_timeout=4 s; ddp_timeout is 600 s


def test_under_torchrun_a_raising_and_a_hanging_rank_are_named(tmp_path):
    code, output = _torchrun("callback", tmp_path / "raise")
    assert code != 0
    assert f"ember: rank 0: stopping because {SAID['callback']}" in output, output[-4000:]
    code, output = _torchrun("hang-callback", tmp_path / "hang")
    assert code != 0
    assert "rank 1 stopped progressing: it has been in the on_step_end callbacks of step 3" in output, output[
        -4000:
    ]


@pytest.mark.parametrize("kill_rank", ["1", "0"])
def test_torchrun_max_restarts_resumes_by_itself_and_ends_equal_to_an_uninterrupted_run(tmp_path, kill_rank):
    launch.check(_by_hand("straight", tmp_path))
    start = time.monotonic()
    code, output = _torchrun("restart", tmp_path, "--max-restarts", "1", env={"KILL_RANK": kill_rank})
    assert code == 0, output[-5000:]
    assert time.monotonic() - start < 200
    # The first attempt was killed at step 6; the restart (the same script) resumed from checkpoint-4.
    meta = (tmp_path / "restart.json").read_text()
    assert '"start_step": 4' in meta and '"attempt": 1' in meta
    newest = tmp_path / "restart" / "checkpoint-4"
    assert f"auto_resume (TORCHELASTIC_RESTART_COUNT=1): resuming from {newest} (step 4)" in output
    got, want = (
        load_file(str(tmp_path / "restart.safetensors")),
        load_file(str(tmp_path / "straight.safetensors")),
    )
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)  # bit for bit
    assert not list((tmp_path / "restart").glob("*.tmp"))


def _raised_after(output: str, rank: int) -> float:
    found = re.findall(rf"rank {rank}: train\(\) raised after ([0-9.]+)s", output)
    assert found, output[-3000:]
    return float(found[-1])


@pytest.mark.parametrize("name", ["save-state", "save-state-fsdp"])
def test_a_rank_failing_before_the_save_collectives_stops_the_others_at_once(tmp_path, name):
    # Rank 1 raises while its own state for checkpoint-4 is gathered, and its process stays alive
    # (a script that catches the error): rank 0, already on its way into the save, must not wait
    # there for ddp_timeout (600 s) nor be killed by the watch's last resort (20 s).
    ranks = launch.run([*WORKER, name, str(tmp_path)], timeout=150, env={"STAY_ALIVE": "25"})
    said = (
        "rank 1 failed while gathering its state for checkpoint-4: "
        "OSError: [Errno 28] No space left on device (gathering the callback state)"
    )
    for rank in ranks:
        assert rank.returncode not in (0, None), rank.output[-3000:]
        assert said in rank.output, f"rank {rank.rank}:\n{rank.output[-3000:]}"
    assert f"ember: rank 0: stopping because {said}" in ranks[0].output
    assert "exits now" not in ranks[0].output  # stopped by PeerFailure, not by os._exit
    # Both ranks started train() within a second or two of each other.
    assert _ended_after(ranks[0].output, 0) - _raised_after(ranks[1].output, 1) < 8
    run = tmp_path / name
    # The previous complete checkpoint stays; nothing of checkpoint-4 was created.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert is_complete_checkpoint(run / "checkpoint-2") and verify_checkpoint(run / "checkpoint-2") is None


def test_a_rank_hanging_while_gathering_its_save_state_is_named_after_peer_stall_timeout(tmp_path):
    ranks = _by_hand("save-hang", tmp_path)
    said = "rank 1 stopped progressing: it has been gathering its state for checkpoint-4 for"
    for rank in ranks:
        assert rank.returncode not in (0, None), rank.output[-3000:]
        assert said in rank.output, f"rank {rank.rank}:\n{rank.output[-3000:]}"
    assert "Its threads' stacks" in ranks[1].output and "fault_worker.py" in ranks[1].output
    assert "while rank 0 was in the save of checkpoint-4" in ranks[0].output
    assert _ended_after(ranks[0].output, 0) < 60  # peer_stall_timeout=4 s; ddp_timeout is 600 s
    run = tmp_path / "save-hang"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert verify_checkpoint(run / "checkpoint-2") is None
