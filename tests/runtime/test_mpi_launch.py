"""Started by mpirun (`deepspeed --launcher openmpi|mvapich`, or mpirun itself): each process takes its
place from the MPI's own variables, so the processes form one world, not a world of one each; without
MASTER_ADDR and mpi4py, one message says what to pass."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port
from trainer.runtime import distributed

OUR_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "OMP_NUM_THREADS")
PLACE = """
import json, os, torch
from trainer.runtime import distributed
distributed.init(1)
print(json.dumps([distributed.rank(), distributed.world_size(), os.environ["LOCAL_RANK"], torch.get_num_threads()]))
"""


@pytest.fixture(autouse=True)
def environment_kept():
    """Every test leaves the process's environment as it found it (set up before monkeypatch, so this
    checks after monkeypatch has undone its changes)."""
    def ours() -> dict[str, str]:
        return {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"}
    before = ours()
    yield
    assert ours() == before


def clear(monkeypatch, names) -> None:
    """Unset `names` for the test, and whatever adopt_mpi_ranks sets under them unset after it: a plain
    delenv of an absent variable records nothing to undo, and a RANK left behind makes every later
    command in the session a rank of a world that never starts."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def child_environment() -> dict[str, str]:
    """This process's environment without any place of its own (rank, address, threads), for a child."""
    return {**{key: value for key, value in os.environ.items() if key not in OUR_NAMES}, "PYTHONPATH": str(ROOT)}


def mpi_environment(name: str, rank: int, size: int, local_rank: int | None = None,
                    local_size: int | None = None) -> dict[str, str]:
    place = (rank, size, rank if local_rank is None else local_rank, size if local_size is None else local_size)
    return dict(zip(distributed.MPI_VARIABLES[name], map(str, place)))


def test_two_processes_started_as_open_mpi_starts_them_form_one_world():
    base = {**child_environment(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    processes = [subprocess.Popen([sys.executable, "-c", PLACE], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                  env={**base, **mpi_environment("Open MPI", rank, 2)}) for rank in range(2)]
    places = [json.loads(process.communicate(timeout=300)[0].splitlines()[-1]) for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    # rank, world size, local rank, and each process's share of this machine's cores
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert places == [[0, 2, "0", threads], [1, 2, "1", threads]]


@pytest.mark.parametrize("name", list(distributed.MPI_VARIABLES))
def test_each_mpis_variables_give_the_place_and_a_launchers_own_win(monkeypatch, name):
    clear(monkeypatch, OUR_NAMES)
    for key, value in {**mpi_environment(name, 5, 8, 1, 4), "MASTER_ADDR": "10.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.adopt_mpi_ranks() == name
    assert [os.environ[key] for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")] == \
        ["5", "8", "1", "4", "29500"]
    for key in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("RANK", "2")  # a launcher's own (DeepSpeed's MPICH and Intel MPI runners set RANK)
    assert distributed.adopt_mpi_ranks() is None and "LOCAL_RANK" not in os.environ


def test_mpirun_with_one_process_and_no_address_is_a_world_of_one():
    """No MASTER_ADDR and no mpi4py needed: the process starts as any single process does."""
    place = subprocess.run([sys.executable, "-c", PLACE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**child_environment(), **mpi_environment("Open MPI", 0, 1)})
    assert place.returncode == 0, place.stderr[-2000:]
    assert json.loads(place.stdout.splitlines()[-1])[:3] == [0, 1, "0"]


def test_no_mpi_no_change(monkeypatch):
    clear(monkeypatch, (*OUR_NAMES, *(variable for names in distributed.MPI_VARIABLES.values() for variable in names)))
    assert distributed.adopt_mpi_ranks() is None and "RANK" not in os.environ


def test_without_master_addr_or_mpi4py_it_says_what_to_pass(monkeypatch):
    clear(monkeypatch, OUR_NAMES)
    for key, value in mpi_environment("Open MPI", 1, 2).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda module: None)
    with pytest.raises(distributed.LaunchError) as error:
        distributed.adopt_mpi_ranks()
    assert str(error.value) == ("started by Open MPI's mpirun without MASTER_ADDR: pass rank 0's address and a port "
                                "to every process (mpirun -x MASTER_ADDR=<node 0> -x MASTER_PORT=29500 ...; through "
                                "deepspeed --launcher: --launcher_args \"-x MASTER_ADDR=<node 0>\", or a MASTER_ADDR= "
                                "line in .deepspeed_env), or pip install mpi4py and DeepSpeed finds them")
