"""Beyond one machine: two "nodes" on this host, each a `deepspeed --no_ssh --node_rank N` launcher
with one rank and an output_dir of its own (no shared filesystem), over localhost or across two
network namespaces; a node dying mid-run; and launch/slurm.sbatch under a stand-in srun.

Every node is started in a session of its own, so a test can kill one node's launcher together
with its rank (os.killpg), as a machine going down would.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, VENV_BIN, free_port, run_cli

# 38 training rows, a global batch of 16 = 2 ranks x micro-batch 4 x accumulation 2. Warmup is
# longer than any run here, so the learning rate of a step does not depend on max_steps and runs
# of 4, 6 or 500 steps take identical steps 1-6.
COMMON = ["data.max_rows=40", "data.eval_fraction=0.05", "data.max_eval_rows=8", "train.global_batch_size=16",
          "train.micro_batch_size=4", "train.warmup_steps=10", "train.save_every=2", "train.eval_every=100",
          "train.log_every=1", "deepspeed.zero_stage=2", "quant.bits=4"]
TWO_NODES = "node0 slots=1\nnode1 slots=1\n"  # names are labels: with --no_ssh nothing resolves them
LAUNCH_TIMEOUT = 600  # seconds for one launch on a busy 2-core machine


def losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def checkpoint_steps(output_dir: Path) -> list[int]:
    found = (output_dir / "checkpoints").glob("step-*/COMPLETE")
    return sorted(int(marker.parent.name.split("-")[1]) for marker in found)


def assert_nothing_written(output_dir: Path) -> None:
    """A node other than node 0 writes neither checkpoints nor metrics into its own output_dir."""
    assert not (output_dir / "checkpoints").exists(), sorted(output_dir.rglob("*"))
    assert not (output_dir / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def one_node_reference(tmp_path_factory, tiny_base) -> dict[int, float]:
    """Losses of steps 1-6 from the usual single-node 2-rank launch of the same recipe."""
    output_dir = tmp_path_factory.mktemp("one_node")
    run_cli(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
             "recipes/tiny_alpaca.yaml", f"output_dir={output_dir}", *COMMON, "train.max_steps=6"],
            timeout=LAUNCH_TIMEOUT)
    return losses(output_dir)


class Node:
    """One node's `deepspeed --no_ssh` launcher, its log in a file (no pipe to fill and block)."""

    def __init__(self, node_rank: int, output_dir: Path, hostfile: Path, master_addr: str, port: int,
                 overrides: tuple[str, ...], log: Path, netns: str | None = None, env: dict | None = None):
        self.node_rank, self.output_dir, self.log = node_rank, output_dir, log
        command = [str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh",
                   "--node_rank", str(node_rank), "--master_addr", master_addr, "--master_port", str(port),
                   "launch/train.py", "recipes/tiny_alpaca.yaml", f"output_dir={output_dir}", *COMMON, *overrides]
        if netns:
            command = ["ip", "netns", "exec", netns, *command]
        with open(log, "w") as handle:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                            start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The launcher and its rank together (its whole session), as when the machine dies."""
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def describe(self) -> str:
        return f"--- node {self.node_rank} (exit {self.process.returncode}) ---\n{self.output()[-5000:]}"


@contextmanager
def two_nodes(tmp_path: Path, name: str, outputs: tuple[Path, Path], *overrides: str, master_addr: str = "127.0.0.1",
              namespaces: tuple[str | None, str | None] = (None, None), envs: tuple[dict, dict] = ({}, {})):
    """Start node 0 and node 1 concurrently; whatever happens, neither outlives the block."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(TWO_NODES)
    port = free_port()
    nodes = [Node(rank, outputs[rank], hostfile, master_addr, port, overrides, tmp_path / f"{name}-node{rank}.log",
                  namespaces[rank], envs[rank]) for rank in (0, 1)]
    try:
        yield nodes
    finally:
        for node in nodes:
            if node.process.poll() is None:
                node.kill()
                node.process.wait(timeout=60)


def wait_all_succeed(nodes: list[Node], timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.time() + timeout
    for node in nodes:
        try:
            node.process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            raise AssertionError("two-node run timed out\n" + "\n".join(n.describe() for n in nodes)) from None
    if any(node.process.returncode != 0 for node in nodes):
        raise AssertionError("a node failed\n" + "\n".join(n.describe() for n in nodes))


def run_two_nodes(tmp_path: Path, name: str, outputs: tuple[Path, Path], *overrides: str, **where) -> list[Node]:
    with two_nodes(tmp_path, name, outputs, *overrides, **where) as nodes:
        wait_all_succeed(nodes)
    return nodes


def check_two_node_run_and_resume(tmp_path: Path, reference: dict[int, float], **where) -> None:
    """4 steps on two nodes, then both relaunched with resume=auto to step 6, each node with its own
    output_dir: only node 0's gets checkpoints and metrics, and the resume comes from it alone."""
    node0, node1 = tmp_path / "node0_out", tmp_path / "node1_out"
    run_two_nodes(tmp_path, "first", (node0, node1), "train.max_steps=4", **where)
    # The same 2 ranks reduce in the same order whichever launcher started them: bitwise equal.
    assert losses(node0) == {step: reference[step] for step in (1, 2, 3, 4)}
    assert checkpoint_steps(node0) == [2, 4]
    assert_nothing_written(node1)

    first_node, _ = run_two_nodes(tmp_path, "resumed", (node0, node1), "train.max_steps=6", "resume=auto", **where)
    assert f"resumed from {node0 / 'checkpoints' / 'step-4'} at step 4" in first_node.output()
    records = [json.loads(line)["step"] for line in (node0 / "metrics.jsonl").read_text().splitlines()]
    assert records == [1, 2, 3, 4, 5, 6]
    assert losses(node0) == {step: reference[step] for step in range(1, 7)}
    assert checkpoint_steps(node0) == [2, 4, 6]
    assert_nothing_written(node1)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_without_shared_storage_match_one_node_and_resume_from_node_0(tmp_path, one_node_reference):
    check_two_node_run_and_resume(tmp_path, one_node_reference)


# ------------------------------------------------------------------------------ two network namespaces

VETH_ADDRESSES = ("10.77.0.1", "10.77.0.2")  # test-local, only ever inside the namespaces made here


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def network_namespaces():
    """Two namespaces joined by a veth pair, 10.77.0.1/24 <-> 10.77.0.2/24, lo up in each.
    Yields ((namespace, interface) for node 0, for node 1); removed afterwards (with the pair)."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = f"{os.getpid() % 100000}"
    names, interfaces = (f"qlora-mn{tag}-0", f"qlora-mn{tag}-1"), (f"qlmn{tag}a", f"qlmn{tag}b")
    created = []
    try:
        for name in names:
            result = _ip("netns", "add", name)
            if result.returncode != 0:
                pytest.skip(f"`ip netns add` failed: {result.stderr.strip()}")
            created.append(name)
        steps = [("link", "add", interfaces[0], "type", "veth", "peer", "name", interfaces[1])]
        for name, interface, address in zip(names, interfaces, VETH_ADDRESSES):
            steps += [("link", "set", interface, "netns", name),
                      ("-n", name, "addr", "add", f"{address}/24", "dev", interface),
                      ("-n", name, "link", "set", interface, "up"),
                      ("-n", name, "link", "set", "lo", "up")]
        for step in steps:
            result = _ip(*step)
            if result.returncode != 0:
                pytest.skip(f"`ip {' '.join(step)}` failed: {result.stderr.strip()}")
        yield tuple(zip(names, interfaces))
    finally:
        _ip("link", "del", interfaces[0])  # only still here if it was never moved into a namespace
        for name in created:
            _ip("netns", "del", name)  # takes the veth inside it along


@pytest.mark.distributed
@pytest.mark.slow  # `make test-slow` (CI runs it after `make test`)
def test_two_nodes_in_separate_network_namespaces_train_and_resume(tmp_path, one_node_reference,
                                                                   network_namespaces):
    (namespace0, interface0), (namespace1, interface1) = network_namespaces
    # gloo picks its address from the interface named here; without it, from the hostname, which
    # does not resolve to an address the other namespace can reach.
    envs = ({"GLOO_SOCKET_IFNAME": interface0}, {"GLOO_SOCKET_IFNAME": interface1})
    check_two_node_run_and_resume(tmp_path, one_node_reference, master_addr=VETH_ADDRESSES[0],
                                  namespaces=(namespace0, namespace1), envs=envs)


# ------------------------------------------------------------------------------ a node dies

COLLECTIVE_TIMEOUT_S = 30
LOST_NODE_SLACK_S = 60  # launcher teardown on a busy machine
LONG_RUN = ("train.max_steps=500", f"train.collective_timeout_minutes={COLLECTIVE_TIMEOUT_S / 60}")


def wait_for_steps(nodes: list[Node], steps: int, timeout: float = LAUNCH_TIMEOUT) -> None:
    """Until node 0 has logged `steps` steps and written a checkpoint; every node must still run."""
    deadline, output_dir = time.time() + timeout, nodes[0].output_dir

    def reached() -> bool:
        metrics = output_dir / "metrics.jsonl"
        return (metrics.exists() and len(metrics.read_text().splitlines()) >= steps
                and bool(checkpoint_steps(output_dir)))

    while not reached():
        if any(node.process.poll() is not None for node in nodes) or time.time() > deadline:
            raise AssertionError(f"no step {steps} and checkpoint in time\n" + "\n".join(n.describe() for n in nodes))
        time.sleep(0.2)


def check_survivor_stops_and_checkpoint_resumes(survivor: Node, stopped_at: float) -> None:
    try:
        survivor.process.wait(timeout=COLLECTIVE_TIMEOUT_S + LOST_NODE_SLACK_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"node 0 still running {COLLECTIVE_TIMEOUT_S + LOST_NODE_SLACK_S} s after node 1 "
                             f"was lost\n{survivor.describe()}") from None
    waited = time.time() - stopped_at
    assert survivor.process.returncode != 0, survivor.describe()
    assert waited < COLLECTIVE_TIMEOUT_S + LOST_NODE_SLACK_S
    # One clear line from the surviving rank instead of a gloo traceback (trainer/cli.py).
    assert "error: lost contact with another rank" in survivor.output(), survivor.describe()
    assert "relaunch with resume=auto" in survivor.output()

    last = checkpoint_steps(survivor.output_dir)[-1]
    result = run_cli(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                      "recipes/tiny_alpaca.yaml", f"output_dir={survivor.output_dir}", *COMMON,
                      f"train.max_steps={last + 2}", "resume=auto"], timeout=LAUNCH_TIMEOUT)
    assert f"at step {last}" in result.stdout
    assert max(losses(survivor.output_dir)) == last + 2


@pytest.mark.distributed
@pytest.mark.slow
def test_when_a_node_dies_the_other_exits_with_a_clear_error_and_the_checkpoint_resumes(tmp_path, tiny_base):
    outputs = (tmp_path / "node0_out", tmp_path / "node1_out")
    with two_nodes(tmp_path, "killed", outputs, *LONG_RUN) as (node0, node1):
        wait_for_steps([node0, node1], steps=3)
        node1.kill(signal.SIGKILL)
        killed_at = time.time()
        node1.process.wait(timeout=60)
        check_survivor_stops_and_checkpoint_resumes(node0, killed_at)


@pytest.mark.distributed
@pytest.mark.slow
def test_when_a_node_hangs_the_other_gives_up_after_the_collective_timeout(tmp_path, tiny_base):
    # A frozen node keeps its sockets open: nothing is reset, only the timeout can end the wait.
    outputs = (tmp_path / "node0_out", tmp_path / "node1_out")
    with two_nodes(tmp_path, "hung", outputs, *LONG_RUN) as (node0, node1):
        wait_for_steps([node0, node1], steps=3)
        node1.kill(signal.SIGSTOP)
        check_survivor_stops_and_checkpoint_resumes(node0, time.time())


# ------------------------------------------------------------------------------ launch/slurm.sbatch

FAKE_SRUN = """#!/bin/bash
# Stand-in for srun: run the step command once per node of the allocation, concurrently.
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" & pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
# Stand-in for `scontrol show hostnames $SLURM_JOB_NODELIST`.
printf '%s\\n' localhost node1
"""
FAKE_DEEPSPEED = """#!/bin/bash
# Records the arguments a launcher was given, one a line, and the hostfile it was pointed at.
printf '%s\\n' "$@" > "$RECORD_DIR/node$SLURM_NODEID.args"
while [[ $# -gt 0 && $1 != --hostfile ]]; do shift; done
cp "$2" "$RECORD_DIR/node$SLURM_NODEID.hostfile"
"""


def fake_slurm(tmp_path: Path, deepspeed: str | None = None) -> dict:
    """PATH with srun and scontrol stand-ins, and the job environment Slurm would set; `deepspeed`,
    when given, replaces the launcher (through VENV)."""
    bin_dir, venv = tmp_path / "fake_bin", ROOT / ".venv"
    scripts = {bin_dir / "srun": FAKE_SRUN, bin_dir / "scontrol": FAKE_SCONTROL}
    if deepspeed is not None:
        venv = tmp_path / "fake_venv"
        scripts[venv / "bin" / "deepspeed"] = deepspeed
    for path, text in scripts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "ignored",
            "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "1", "VENV": str(venv),
            "MASTER_PORT": str(free_port())}


def test_slurm_script_starts_one_no_ssh_launcher_per_node_with_the_allocation_hostfile(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    env = {**os.environ, **fake_slurm(tmp_path, FAKE_DEEPSPEED), "RECORD_DIR": str(records)}
    result = subprocess.run(["bash", "launch/slurm.sbatch", "recipes/tiny_alpaca.yaml", "output_dir=runs/x y"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for node in (0, 1):
        arguments = (records / f"node{node}.args").read_text().splitlines()
        script = arguments.index("launch/train.py")
        assert arguments[script:] == ["launch/train.py", "recipes/tiny_alpaca.yaml", "output_dir=runs/x y"]
        flags = arguments[:script]
        assert "--no_ssh" in flags
        values = _flag_values(flags)
        assert values == {"--hostfile": values["--hostfile"], "--node_rank": str(node), "--master_addr": "localhost",
                          "--master_port": env["MASTER_PORT"], "--num_nodes": "2", "--num_gpus": "1"}
        # Each node writes its own hostfile (no shared filesystem needed), in the allocation's order.
        assert (records / f"node{node}.hostfile").read_text().splitlines() == ["localhost slots=1", "node1 slots=1"]


def _flag_values(flags: list[str]) -> dict[str, str]:
    rest = [flag for flag in flags if flag != "--no_ssh"]
    return dict(zip(rest[::2], rest[1::2]))


def test_slurm_script_refuses_to_start_without_a_recipe(tmp_path):
    env = {**os.environ, **fake_slurm(tmp_path, FAKE_DEEPSPEED), "RECORD_DIR": str(tmp_path)}
    result = subprocess.run(["bash", "launch/slurm.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.distributed
@pytest.mark.slow  # `make test-slow` (CI runs it after `make test`)
def test_slurm_script_trains_on_two_nodes_with_a_shared_output_dir(tmp_path, one_node_reference):
    output_dir = tmp_path / "shared_out"
    result = subprocess.run(["bash", "launch/slurm.sbatch", "recipes/tiny_alpaca.yaml", f"output_dir={output_dir}",
                             *COMMON, "train.max_steps=4"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **fake_slurm(tmp_path)}, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    # Both nodes see the one output_dir (a shared filesystem): still only rank 0 writes into it.
    assert losses(output_dir) == {step: one_node_reference[step] for step in (1, 2, 3, 4)}
    assert checkpoint_steps(output_dir) == [2, 4]


def test_nccl_async_error_handling_is_on_unless_the_environment_says_otherwise(monkeypatch):
    from trainer.runtime.distributed import nccl_error_handling

    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    nccl_error_handling()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    nccl_error_handling()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_cpu_ranks_of_one_machine_split_its_cores_unless_omp_num_threads_is_set(monkeypatch):
    import torch

    from trainer.runtime.distributed import share_cores

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "2")  # what the deepspeed launcher sets
        cores = len(os.sched_getaffinity(0))
        assert share_cores() == max(1, cores // 2) == torch.get_num_threads()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))  # torchrun's name; more ranks than cores
        assert share_cores() == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
        assert share_cores() is None
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert share_cores() is None
    finally:
        torch.set_num_threads(before)
