"""Process-group helpers: one code path whether launched by `deepspeed` or as a single process."""
from __future__ import annotations

import atexit
import importlib.util
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

_started = False  # whether this process ever started a process group (see finish)
# Where each MPI's mpirun gives a process its place: (rank, world size, local rank, local world size).
MPI_VARIABLES = {
    "Open MPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "MVAPICH": ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    "MPICH / Intel MPI": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


class LaunchError(RuntimeError):
    """The processes were started in a way that cannot form the world they are part of."""


def init(timeout_minutes: float = 30.0) -> torch.device:
    """Start the process group (gloo on CPU, NCCL on GPU) and return this rank's device.
    `timeout_minutes` bounds every collective: if a rank dies, the others fail after it, never hang
    (gloo: a Python error, reported as a lost rank; NCCL: see `nccl_error_handling`)."""
    import deepspeed

    adopt_mpi_ranks()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank())
        nccl_error_handling()
    else:
        share_cores()
    if "RANK" not in os.environ:
        # A plain `python launch/train.py` run: a world of one on a free local port.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    timeout = timedelta(minutes=timeout_minutes)
    # DeepSpeed makes its own groups (ZeRO reduces over a clone of the world group) with
    # dist.new_group() and no timeout, i.e. torch's 30-minute default: make ours the default.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if use_cuda and hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    _skip_shared_memory_op()  # also for deepspeed.initialize on a process group made elsewhere
    global _started
    _started = True  # before the start itself: a rank that fails in it leaves through finish too
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", timeout=timeout, verbose=False)
    return torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")


def adopt_mpi_ranks() -> str | None:
    """Under mpirun (`deepspeed --launcher openmpi` or `mvapich`, or mpirun itself) with more than one
    process, where no launcher set RANK, take RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from the
    MPI's own variables, so each process knows its place before the process group starts (its GPU, its
    share of the cores), and is not taken for a world of one. Returns the MPI found, or None (`mpirun -n
    1` too: `init` starts it as any world of one). Rank 0's address: MASTER_ADDR where given (MASTER_PORT
    29500 unless given); else DeepSpeed finds it through mpi4py, and without mpi4py this says what to pass."""
    if "RANK" in os.environ:  # a launcher's own (DeepSpeed's, torchrun, its MPICH and Intel MPI runners) wins
        return None
    for name, variables in MPI_VARIABLES.items():
        if all(variable in os.environ for variable in variables) and int(os.environ[variables[1]]) > 1:
            for ours, theirs in zip(("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"), variables):
                os.environ.setdefault(ours, os.environ[theirs])
            if "MASTER_ADDR" in os.environ:
                os.environ.setdefault("MASTER_PORT", "29500")  # torch's default port, as DeepSpeed's launcher's
            elif importlib.util.find_spec("mpi4py") is None:
                raise LaunchError(f"started by {name}'s mpirun without MASTER_ADDR: pass rank 0's address and a "
                                  f"port to every process (mpirun -x MASTER_ADDR=<node 0> -x MASTER_PORT=29500 ...; "
                                  f"through deepspeed --launcher: --launcher_args \"-x MASTER_ADDR=<node 0>\", or a "
                                  f"MASTER_ADDR= line in .deepspeed_env), or pip install mpi4py and DeepSpeed finds them")
            return name
    return None


def share_cores() -> int | None:
    """On CPU, the ranks of one machine split its cores: each rank's torch runs cores / local ranks
    threads, unless OMP_NUM_THREADS says otherwise. The deepspeed launcher sets no thread count
    (torchrun sets 1), so every rank started a thread per core; with 2 ranks on 2 cores, 4 busy
    threads on 2 cores made the real base's first step take 37-60 s instead of 2.6 s. Returns the
    threads set, or None when left alone."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    if local <= 1:
        return None
    threads = max(1, len(os.sched_getaffinity(0)) // local)
    torch.set_num_threads(threads)
    return threads


def nccl_error_handling() -> None:
    """Before the NCCL group starts: a failed or timed-out collective ends the process (torch's
    watchdog aborts NCCL and the process with SIGABRT) instead of leaving it hung in a kernel.
    This is not a Python error: a rank ended that way prints torch's watchdog message, not ours,
    and exits with SIGABRT (134), not 2. A value set in the environment is kept."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")


def started() -> bool:
    """Whether this process ever started a process group (it then ends through finish)."""
    return _started


def finish(code: int = 0) -> None:
    """End a script's process the way its run ended: `code` 0 for success, else its exit code.

    A process that started a process group leaves through os._exit, after the exit handlers
    (atexit: logging, ...) and with its standard streams flushed, skipping the interpreter's
    finalisation. Gloo's worker threads release the tensors of the last collectives after the
    collectives complete, which takes the GIL; one still doing so when finalisation starts is
    stopped inside a C++ destructor, and the rank dies with "terminate called without an active
    exception" (SIGABRT) after a run that did everything right, failing the whole job at the
    launcher. destroy_process_group alone does not prevent it: DeepSpeed keeps its groups.

    Gloo groups are ended first after a success, or in a world of one; not after an error with
    peers, which may still be inside a collective with this rank (tearing down under them hangs
    until the collective timeout). NCCL groups are left to os._exit: NCCL's teardown expects every
    rank of a node to take part, and a peer may have failed after the last collective. Without a
    process group: a plain return, or sys.exit(code)."""
    if (dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"
            and (code == 0 or world_size() == 1)):
        try:
            dist.destroy_process_group()
        except Exception as error:  # the exit code says how the run ended; this does not change it
            print(f"warning: ending the process group failed: {error}", file=sys.stderr)
    if not _started:
        if code:
            sys.exit(code)
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):  # None, closed, or a pipe whose reader left
            pass
    os._exit(code)


def _skip_shared_memory_op() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce.

    That op serves DeepSpeed's inference tensor parallelism only (training reduces through
    torch.distributed). Loading it JIT-compiles a C++ extension under a lock file in
    ~/.cache/torch_extensions that every process takes, even when the build is up to date: a rank
    killed while holding it (a failed sibling, a timeout, Ctrl-C) leaves the lock behind, and from
    then on every run on that machine waits for it forever at start-up. Its /dev/shm buffers also
    outlive killed ranks. DeepSpeed reads the op's availability from the dict edited here.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def free_port() -> int:
    """A TCP port free on this machine now (another job may hold DeepSpeed's default, 29500)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not (dist.is_initialized() and world_size() > 1):
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value, source: int = 0):
    if not (dist.is_initialized() and world_size() > 1):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def main_first():
    """Context manager: each node's local rank 0 runs the body first (e.g. builds a cache on that
    node's disk), the node's other ranks after it. Nodes need not share a filesystem."""
    from contextlib import contextmanager

    @contextmanager
    def ordered():
        if local_rank() != 0:
            barrier()
        yield
        if local_rank() == 0:
            barrier()

    return ordered()
