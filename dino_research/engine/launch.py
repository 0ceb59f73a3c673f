"""Start one process per device: under torchrun/SLURM, by spawning local workers, or in-process.

Backend: NCCL where CUDA is available, gloo otherwise, so ``--num-gpus 2`` on a CPU-only machine runs
two gloo workers and DDP is testable without a GPU.

CPU threads: each process would otherwise start as many intra-op threads as the machine has cores,
so N workers on one machine run N times more threads than cores, and their OpenMP threads spin
waiting for each other (2 gloo workers on 2 cores: 5x slower per iteration than with one thread
each). The workers of one machine share its cores instead (:func:`cpu_threads_per_worker`), unless
``OMP_NUM_THREADS`` says otherwise or a scheduler already pinned the process to its own cores.
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import logging
import os
import signal
import socket
import sys
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..utils.errors import report_user_errors

logger = logging.getLogger(__name__)

# Long enough for a slow checkpoint write on a busy file system, short enough that a dead peer
# surfaces as an error instead of a hang of days.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def cpu_threads_per_worker(local_world_size: int, environ: Mapping[str, str] = os.environ,
                           available: Optional[int] = None, total: Optional[int] = None) -> Optional[int]:
    """Intra-op threads for each of ``local_world_size`` processes sharing this machine, or None to
    leave torch's default.

    None when there is one process, when ``OMP_NUM_THREADS`` is set (torchrun sets it to 1; a user
    may choose), or when this process may use fewer CPUs than the machine has (``available`` <
    ``total``: SLURM or ``taskset`` gave it its own cores, and torch's default already counts them).
    Otherwise the available CPUs divided among the processes, at least 1. ``available`` and ``total``
    default to this process's CPU affinity and ``os.cpu_count()``.
    """
    if local_world_size <= 1 or "OMP_NUM_THREADS" in environ:
        return None
    available = len(os.sched_getaffinity(0)) if available is None else available
    total = (os.cpu_count() or available) if total is None else total
    if available < total:
        return None
    return max(1, available // local_world_size)


def _share_cpu_threads(local_world_size: int) -> None:
    threads = cpu_threads_per_worker(local_world_size)
    if threads is not None:
        torch.set_num_threads(threads)
        logger.info("%d processes share this machine: %d CPU threads each (set OMP_NUM_THREADS to choose)",
                    local_world_size, threads)


def launched_externally() -> bool:
    """True under torchrun (or a SLURM wrapper that exported the same variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def launch(main_func: Callable, num_gpus_per_machine: int = 1, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args: tuple = (), timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> None:
    """Run ``main_func(*args)`` on every process of the job.

    * torchrun environment present (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): join that process group
      (``MASTER_ADDR``/``MASTER_PORT`` from the environment) and run in this process.
    * ``num_gpus_per_machine * num_machines > 1``: spawn ``num_gpus_per_machine`` local workers.
      ``dist_url`` is ``tcp://HOST:PORT`` of machine 0 (``"auto"``: a free local port, one machine only).
    * otherwise: run in this process with no process group.
    """
    if launched_externally():
        local_rank = int(os.environ["LOCAL_RANK"])
        _share_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=default_backend(), init_method="env://", timeout=timeout)
        try:
            main_func(*args)
        finally:
            dist.destroy_process_group()
        return
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine; pass tcp://HOST:PORT of machine 0")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    context = mp.start_processes(
        _distributed_worker, nprocs=num_gpus_per_machine, join=False, start_method="spawn",
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
    )

    def forward(signum, frame):  # a stop signal sent to this launcher reaches every worker
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        while not context.join():
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _distributed_worker(local_rank: int, main_func: Callable, world_size: int, num_gpus_per_machine: int,
                        machine_rank: int, dist_url: str, args: tuple, timeout: datetime.timedelta) -> None:
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    os.environ.update(RANK=str(global_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(num_gpus_per_machine))
    _share_cpu_threads(num_gpus_per_machine)
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"--num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} visible GPUs")
        torch.cuda.set_device(local_rank)
    # A worker killed by a C++ abort or a segfault prints every thread's Python stack to stderr.
    faulthandler.enable(all_threads=True)
    dist.init_process_group(backend=default_backend(), init_method=dist_url, world_size=world_size,
                            rank=global_rank, timeout=timeout)
    try:
        # A user error ends this worker with one message (rank 0 prints it) and USER_ERROR_EXIT, which
        # the launcher recognises; anything else keeps its traceback.
        with report_user_errors(rank=global_rank):
            main_func(*args)
        gc.collect()  # a trainer kept alive by a reference cycle frees its loader workers and DDP now
        # Leave together: no rank tears its connections down while rank 0 still writes the final
        # checkpoint or a peer still talks to it.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    _exit_finished_worker()


def _exit_finished_worker() -> None:
    """End a worker whose work is done and flushed, without the interpreter's shutdown.

    A spawned worker otherwise finalizes Python and then runs the C++ global destructors, while
    torch's background threads (gloo, autograd, the allocator's) may still wake up and take the
    GIL: such a thread is then killed inside C++ code, and the process aborts with "terminate
    called without an active exception" (SIGABRT) after a training that had finished and saved
    everything; the launcher reports the job as failed. Seen once in CI on a 2-process gloo run.
    Logs and standard streams are flushed first; this module starts no other process or thread.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream has nothing left to lose
            pass
    os._exit(0)


def local_rank() -> int:
    """This process's index among the processes of its machine (0 without a process group)."""
    return int(os.environ.get("LOCAL_RANK", 0))
