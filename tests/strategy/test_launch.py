"""Launching with torchrun itself (c10d rendezvous, as on several nodes): `ember train CONFIG`
runs unchanged on 2 processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.strategy.launch import REPO, free_port, rank_env

pytest.importorskip("tokenizers")


def test_ember_train_under_torchrun_with_c10d_rendezvous(tmp_path):
    from tests.cli.test_cli import tiny_job

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_job(tmp_path, save_strategy="steps", save_steps=2)))
    env = rank_env(0, 1, free_port())
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name)  # torchrun sets them
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", "2",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "ember-test",
        "-m", "ember.cli", "train", str(config), "--max_steps", "4",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    run = tmp_path / "run"
    assert (run / "model.safetensors").exists()
    checkpoint = run / "checkpoint-4"
    assert (checkpoint / "rank-0.json").exists() and (checkpoint / "rank-1.json").exists()
    assert json.loads((checkpoint / "trainer.json").read_text())["state"]["world_size"] == 2
