"""The soak across ranks: where a kill landed is read from phase records, which survive kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.soak_ranks import (
    LOCATIONS,
    TARGETS,
    Tail,
    classify,
    location,
    make_plan,
    open_phases,
    parse_phases,
    steps_for,
)

ROOT = Path(__file__).resolve().parents[2]


def test_a_torn_last_record_is_dropped_and_the_rest_read():
    text = "1.5 begin step 3\n1.6 end step 3\n1.7 begin save-sync 4\n1.8 beg"
    assert parse_phases(text) == [
        (1.5, "begin", "step", 3),
        (1.6, "end", "step", 3),
        (1.7, "begin", "save-sync", 4),
    ]
    assert open_phases(parse_phases(text)) == ["save-sync"]


def test_open_phases_at_a_moment_ignore_what_came_after():
    records = parse_phases(
        "1.0 begin step 1\n2.0 end step 1\n3.0 begin save-async 2\n4.0 begin step 3\n5.0 end step 3\n"
    )
    assert open_phases(records, at=1.5) == ["step"]
    assert open_phases(records, at=2.5) == []
    assert open_phases(records, at=4.5) == ["save-async", "step"]
    assert open_phases(records) == ["save-async"]


def test_the_most_specific_phase_names_the_location():
    assert location(["save-sync", "rotation"]) == "rotation"  # a rotation runs inside a save
    assert location(["save-async", "step"]) == "async save"  # a background write beside a step
    assert location(["step"]) == "step"
    assert location([]) == "between steps"
    assert set(LOCATIONS) == set(TARGETS) | {"between steps"}


def test_a_kill_of_one_rank_while_rank_0_rotates_lands_in_the_rotation_for_the_job():
    rank0 = parse_phases(
        "1.0 begin save-sync 8\n1.4 begin rotation 8\n1.9 end rotation 8\n2.0 end save-sync 8\n"
    )
    # Rank 1 left the save (nothing to rotate there) and waits in the next step; killed at 1.5.
    rank1 = parse_phases("1.0 begin save-sync 8\n1.35 end save-sync 8\n1.36 begin step 9\n")
    got = classify({0: rank0, 1: rank1}, victim=1, killed_at=1.5)
    assert got["landed"] == "rotation"
    assert got["landed_on_victim"] == "step"
    assert got["victim_open_phases"] == ["step"]
    assert got["victim_last_step"] == 9
    # The same moment with rank 0 killed: its own records stop inside the rotation.
    got = classify({0: rank0[:2], 1: rank1}, victim=0, killed_at=1.5)
    assert got["landed"] == got["landed_on_victim"] == "rotation"


def test_the_plan_aims_at_every_location_in_turn_with_the_save_mode_it_needs():
    plan = make_plan(30, ranks=4, seed=3)
    aimed = Counter(p["target"] for p in plan)
    assert sorted(aimed.values()) == [7, 7, 8, 8]
    for p in plan:
        if p["target"] == "async save":
            assert p["save_async"]
        if p["target"] in ("sync save", "step"):
            assert not p["save_async"]
        assert 0 <= p["victim"] < 4 and p["saves"] in (1, 2)
    assert {p["victim"] for p in plan} == {0, 1, 2, 3}
    assert make_plan(30, ranks=4, seed=3) == plan
    # Each attempt is killed at most 4 steps past its resume (6 in the first): the job outlasts the kills.
    assert steps_for(30) > 6 + 4 * 29


def test_tail_reads_records_as_the_log_grows_and_waits_for_a_line_to_finish(tmp_path: Path):
    path = tmp_path / "log"
    tail = Tail(path)
    assert tail.poll() == []  # not there yet
    path.write_text("1.0 begin step 1\n2.0 end st")
    assert tail.poll() == [(1.0, "begin", "step", 1)]
    with path.open("a") as f:
        f.write("ep 1\n")
    assert tail.poll()[-1] == (2.0, "end", "step", 1)


_KILLED_JOB = """
import sys, time
from pathlib import Path
from bench.soak_ranks import PhaseLog
log = PhaseLog(Path(sys.argv[1]))
log.mark("begin", "step", 7)
log.mark("end", "step", 7)
log.mark("begin", "save-sync", 8)
Path(sys.argv[2]).write_text("in")
time.sleep(60)
log.mark("end", "save-sync", 8)
"""


def test_records_written_before_a_kill_9_are_on_disk_and_place_the_kill(tmp_path: Path):
    log, flag = tmp_path / "phases.log", tmp_path / "flag"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_JOB, str(log), str(flag)], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    records = parse_phases(log.read_text())
    assert classify({0: records}, victim=0, killed_at=killed_at)["landed"] == "sync save"
