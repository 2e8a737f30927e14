"""Several machines: torchrun's arguments for a c10d rendezvous, and 2 "nodes" of 1 rank each on 127.0.0.1 (two
`cham train --nnodes 2 --node-rank R --rdzv-endpoint` processes) training exactly as 2 ranks of one node."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flows.train_launcher import Nodes, launcher_command, torchrun_arguments

REPO = Path(__file__).resolve().parents[2]


def test_one_node_is_standalone() -> None:
    assert torchrun_arguments(2, "train", "c.yaml")[:2] == ["--standalone", "--nproc_per_node=2"]
    assert launcher_command(2, "sft", "c.yaml")[1:] == ["-m", "flows.train_launcher", "2", "sft", "c.yaml"]


def test_several_nodes_meet_at_node_0() -> None:
    first = torchrun_arguments(8, "train", "c.yaml", Nodes(4, 0, "node0:29400", "run42"))
    assert "--standalone" not in first
    assert first[:6] == [
        "--nnodes=4",
        "--node_rank=0",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29400",
        "--rdzv_id=run42",
        "--rdzv_conf=is_host=true",
    ]
    assert first[6:] == ["--nproc_per_node=8", "--max_restarts=0", "-m", "flows.train_worker", "train", "c.yaml"]
    assert "--rdzv_conf=is_host=false" in torchrun_arguments(8, "train", "c.yaml", Nodes(4, 3, "node0:29400"))
    # The launcher's own command line carries the nodes to torchrun on each machine.
    command = launcher_command(8, "train", "c.yaml", Nodes(4, 3, "node0:29400"))
    assert command[-4:] == ["--nnodes=4", "--node-rank=3", "--rdzv-endpoint=node0:29400", "--rdzv-id=cham"]


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ((2, 0, None), "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        ((2, 2, "h:1"), "--node-rank 2 is not one of the 2 nodes (0 to 1)"),
        ((2, 1, "h"), "--rdzv-endpoint 'h' is not HOST:PORT"),
        ((2, 1, "h:99999"), "is not HOST:PORT"),
        ((0, 0, None), "--nnodes must be at least 1"),
    ],
)
def test_nodes_are_checked(nodes: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Nodes(*nodes)


def test_the_cli_refuses_nodes_without_an_endpoint(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    config = tmp_path / "t.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": {"preset": "tiny"}, "data": str(tmp_path), "out_dir": str(tmp_path / "o"), "steps": 2}
            | {"global_batch_size": 2, "schedule": {"warmup_steps": 1}}
        )
    )
    result = CliRunner().invoke(app, ["train", str(config), "--nnodes", "2"])
    assert result.exit_code == 1 and "needs --rdzv-endpoint HOST:PORT" in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(stage: Path, out: Path) -> Path:
    data = {
        "model": {"preset": "tiny"},
        "data": str(stage),
        "out_dir": str(out),
        "seq_len": 128,
        "steps": 3,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"every_steps": 3},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_nodes_train_as_two_ranks_of_one(make_stage, tmp_path: Path) -> None:
    stage = make_stage(12_000, sequences_per_shard=32)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cham = [sys.executable, "-m", "flows", "train"]

    one_node = subprocess.run(
        [*cham, str(write_config(stage, tmp_path / "one")), "--nproc-per-node", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one_node.returncode == 0, one_node.stderr[-3000:]

    config = write_config(stage, tmp_path / "two")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [*cham, str(config), "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", endpoint],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 0)  # the node that does not host the rendezvous may start first: it waits for node 0
    ]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]

    assert len(losses(tmp_path / "two")) == 3 and losses(tmp_path / "two") == losses(tmp_path / "one")
    step = Path("checkpoints") / "step-00000003" / "model.pt"
    two = torch.load(tmp_path / "two" / step, weights_only=True)
    one = torch.load(tmp_path / "one" / step, weights_only=True)
    assert two.keys() == one.keys() and all(torch.equal(two[k], one[k]) for k in one)
