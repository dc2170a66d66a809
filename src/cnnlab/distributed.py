"""Data-parallel training on torch.distributed: the processes of a run, and torch's launcher.

``cnnlab train RECIPE --nproc N`` starts N processes on this machine through torchrun (``launch``);
on several machines the user runs torchrun around ``python -m cnnlab train RECIPE``. Each process
joins the process group torchrun's environment describes (``session``: gloo for CPU tensors, NCCL
for CUDA ones) and learns its ``World``. The training loop uses the helpers below: DDP around the
model (gradients averaged over processes after every backward), training counts summed over
processes, evaluation sharded and gathered, rank 0's BatchNorm statistics for evaluation and
checkpoints. With one process every helper does nothing.

The recipe means the same at any number of processes: ``data.batch_size`` is the global batch and
each process takes ``batch_size / processes`` images of it (the batch size must be a multiple of
the number of processes), so the LR schedule counts the same global steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from cnnlab.errors import CnnlabError

BACKENDS = ("auto", "gloo", "nccl")
# how long a collective waits for the others: past it a process that vanished without closing its
# connections (a machine lost) ends the job; one that exits or is killed ends it at once
TIMEOUT_S = 300
# set for the workers cnnlab's own launcher starts: it reports a lost process itself
LAUNCHER_ENV = "CNNLAB_LAUNCHER"
LOST_EXIT = 3  # a worker's exit code when another process of the job was lost


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank on this machine: the GPU it uses
    local_size: int = 1  # processes on this machine

    @property
    def main(self) -> bool:
        """Rank 0 alone writes the run directory and prints."""
        return self.rank == 0

    @property
    def threads(self) -> int:
        """CPU threads per process by default: this machine's cores shared out (0: torch's choice)."""
        return max(1, cores() // self.local_size) if self.size > 1 else 0


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def world_from_env() -> World:
    """The World torchrun's environment variables describe (none set: one process)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                 int(env.get("LOCAL_WORLD_SIZE", 1)))


def backend_name(backend: str) -> str | None:
    """torch's name for ``backend``: "auto" is gloo without CUDA, else None (torch's default: gloo
    for CPU tensors, NCCL for CUDA tensors)."""
    if backend not in BACKENDS:
        raise CnnlabError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise CnnlabError("--backend nccl needs CUDA GPUs and this machine has none; use --backend gloo "
                          "(or leave --backend out: gloo on CPU, NCCL on CUDA)")
    if backend == "auto":
        return None if torch.cuda.is_available() else "gloo"
    return backend


@contextlib.contextmanager
def session(backend: str = "auto"):
    """Join the process group of a torchrun job for the block (none with one process, or when the
    caller has joined one already); yields the World.

    A block that ends cleanly ends in a barrier: while it waits, gloo's worker threads can take the
    GIL and let go of the last collectives' tensors, which makes the abort ``end_worker`` avoids
    rarer for a script that exits without it (7 of 45 two-process runs aborted, 2 of 39 with it)."""
    name = backend_name(backend)
    world = world_from_env()
    if world.size == 1 or dist.is_initialized():
        yield world
        return
    dist.init_process_group(name, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        yield world
        # NCCL's barrier is told the GPU of this process (place() made it current), or torch warns
        dist.barrier(device_ids=[torch.cuda.current_device()]) if dist.get_backend() == "nccl" else dist.barrier()
    finally:
        dist.destroy_process_group()


def end_worker(code: int) -> NoReturn:
    """End a process of a data-parallel job with exit status ``code``, without the interpreter's
    shutdown: output flushed, then ``os._exit``.

    A gloo worker thread lets go of a finished collective's tensors after the caller has moved on,
    and needs the GIL for it; when the interpreter was shutting down by then, the thread was torn
    down inside a C++ destructor and the process aborted ("terminate called without an active
    exception", SIGABRT), though its work was done and saved. Two-process runs that exit just after
    a broadcast, on a loaded 2-core host: 7 of 45 aborted; 2 of 39 with the barrier that ends
    ``session``; 0 of 13 ending here. The threads outlive ``destroy_process_group`` (DDP keeps the
    process group), so only skipping the shutdown is sure. cnnlab's files are complete (written,
    synced and renamed) before this point."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_batch(batch_size: int, processes: int) -> None:
    """The global batch must split evenly: every process takes batch_size / processes images per step."""
    if batch_size % processes == 0:
        return
    fit = -(-batch_size // processes) * processes
    few = (f"gives fewer than one image to each of {processes} processes" if batch_size < processes else
           f"does not split evenly over {processes} processes")
    raise CnnlabError(f"data.batch_size = {batch_size} {few} (the batch is global: each process takes "
                      f"batch_size / processes images); use a multiple of {processes}, e.g. {fit}, or fewer processes")


def check_gpus(nccl: bool, cuda: bool, local_processes: int) -> None:
    """NCCL moves CUDA tensors only; each process on a machine takes a GPU of its own."""
    if nccl and not cuda:
        raise CnnlabError("train.device = \"cpu\" with the NCCL backend, which moves CUDA tensors only; use "
                          "--backend gloo, or train.device = \"auto\"")
    if cuda and local_processes > torch.cuda.device_count():
        raise CnnlabError(f"{local_processes} processes on this machine but {torch.cuda.device_count()} GPU(s): each "
                          f"process takes a GPU of its own; use --nproc {torch.cuda.device_count()} (or train.device = "
                          f"\"cpu\" with --backend gloo)")


def place(world: World, device: torch.device) -> torch.device:
    """This process's device: with several processes, a CUDA device is the GPU of the local rank."""
    if world.size == 1:
        return device
    check_gpus(dist.get_backend() == "nccl", device.type == "cuda", world.local_size)
    if device.type != "cuda":
        return device
    device = torch.device("cuda", world.local_rank)
    torch.cuda.set_device(device)
    return device


class DataParallel:
    """DistributedDataParallel around ``module``, built when training first steps and again when
    the set of trainable parameters changes: DDP waits for a gradient of every parameter that was
    trainable when it was built (airbench94 freezes its whitening bias after a few epochs)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.ddp: torch.nn.Module | None = None
        self.trainable: list[bool] | None = None

    def wrapper(self) -> torch.nn.Module:
        trainable = [p.requires_grad for p in self.module.parameters()]
        if trainable != self.trainable:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
            self.trainable = trainable
        return self.ddp


def no_sync(module: torch.nn.Module, last: bool):
    """Around a micro-batch's forward and backward: DDP's ``no_sync`` on all but the last part of a
    step (gradients stay local and add up; the last backward all-reduces their sum once)."""
    if last or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def check_sync_bn(asked: bool, device_type: str, processes: int) -> None:
    if asked and processes > 1 and device_type != "cuda":
        raise CnnlabError("train.sync_bn = true needs CUDA (SyncBatchNorm does not run on CPU); set "
                          "train.sync_bn = false: each process then normalises with its own images' statistics")


def sync_batchnorm(model: torch.nn.Module, world: World, device: torch.device, asked: bool) -> torch.nn.Module:
    """With ``train.sync_bn`` on CUDA: BatchNorm statistics over the whole global batch. Without it
    (and always on CPU, where SyncBatchNorm does not run) each process normalises by its own images."""
    check_sync_bn(asked, device.type, world.size)
    if not asked or world.size == 1:
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def sum_over(world: World, *values: torch.Tensor) -> list[float]:
    """Scalar tensors summed over the processes, as floats (one all-reduce)."""
    total = torch.stack([v.detach().double() for v in values])
    if world.size > 1:
        dist.all_reduce(total)
    return total.tolist()


def gather(world: World, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each CPU tensor concatenated over the processes in rank order (a sharded evaluation's outputs)."""
    if world.size == 1:
        return list(tensors)
    parts: list = [None] * world.size
    dist.all_gather_object(parts, tensors)
    return [torch.cat(p) for p in zip(*parts)]


def broadcast(world: World, obj):
    """Rank 0's ``obj`` in every process."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_buffers(world: World, *modules: torch.nn.Module | None) -> None:
    """Rank 0's buffers (BatchNorm statistics) in every process: each process's own follow its own
    images; evaluation and checkpoints use rank 0's, as DDP does at every training step."""
    if world.size == 1:
        return
    for m in modules:
        for b in (m.buffers() if m is not None else ()):
            dist.broadcast(b, 0)


def shard(n: int, world: World) -> slice:
    """This process's consecutive part of ``n`` items (sizes differ by at most one)."""
    return slice(n * world.rank // world.size, n * (world.rank + 1) // world.size)


def fork_rng(world: World) -> None:
    """Give ranks other than 0 their own stream of torch's global generator (dropout masks): every
    process starts from the same seed or checkpoint; rank 0 keeps the one-process stream."""
    if world.rank:
        torch.manual_seed(int(torch.randint(0, 2 ** 62, ())) + world.rank)


def peer_lost(error: BaseException) -> bool:
    """A collective failed because another process of the job is gone (its connections closed)."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("Connection closed by peer" in text or "Connection reset by peer" in text)


def report_peer_lost() -> bool:
    """Whether this worker says so itself (cnnlab's launcher names the process that stopped instead)."""
    return LAUNCHER_ENV not in os.environ


# ----------------------------------------------------------------------------- launching on this machine


class JobFailed(Exception):
    """A process of the job died or failed; the message names its rank and how it ended, and
    ``output`` the file that holds what it wrote (None: nothing, or rank 0's, on the console)."""

    def __init__(self, message: str, output: Path | None = None):
        super().__init__(message)
        self.output = output


def check_launch(cfg, nproc: int, backend: str, port: int | None) -> None:
    """What can be checked before starting ``nproc`` processes for the run of Config ``cfg``."""
    if nproc < 1:
        raise CnnlabError(f"--nproc {nproc}: give the number of processes to train with, 1 or more (e.g. --nproc 2)")
    if world_from_env().size > 1:
        raise CnnlabError("--nproc starts processes of its own; under torchrun leave it out (torchrun's "
                          "--nproc-per-node says how many)")
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    check_gpus(backend_name(backend) == "nccl", cuda, nproc)
    check_batch(cfg.data.batch_size, nproc)
    check_sync_bn(cfg.train.sync_bn, "cuda" if cuda else "cpu", nproc)
    if port is None:
        return
    if not 0 < port < 65536:
        raise CnnlabError(f"--master-port {port}: expected a TCP port, 1 to 65535")
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            raise CnnlabError(f"--master-port {port}: the port is in use on this machine; pass another, or leave "
                              f"--master-port out (a free port is chosen)") from None


def torchrun_argv(nproc: int, worker_args: list[str], port: int | None = None, logs: Path | None = None) -> list[str]:
    """torchrun's arguments for ``python -m cnnlab WORKER_ARGS`` in ``nproc`` processes: no restarts,
    rank 0's output on the console, the others' in the folder ``logs`` (torchrun's own if None)."""
    rendezvous = (["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}"] if port else ["--standalone"])
    redirects = ["--redirects", ",".join(f"{r}:3" for r in range(1, nproc))] if nproc > 1 else []
    log_dir = ["--log-dir", str(logs)] if logs is not None else []
    return ["--nproc-per-node", str(nproc), *rendezvous, "--max-restarts", "0", *redirects, *log_dir,
            "-m", "cnnlab", *worker_args]


def launch(nproc: int, worker_args: list[str], port: int | None = None) -> int:
    """Run ``python -m cnnlab WORKER_ARGS`` in ``nproc`` processes through torchrun and wait for them.
    Returns 0, or a worker's own exit code when rank 0 said why (2 bad input, 130 interrupted);
    raises JobFailed when a process died or failed otherwise (the others are stopped at once).
    The other ranks' output goes to a temporary folder, deleted unless a JobFailed names a file in it."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logs = Path(tempfile.mkdtemp(prefix="cnnlab-workers-"))
    try:
        args = torchrun.parse_args(torchrun_argv(nproc, worker_args, port, logs))
        with worker_env({LAUNCHER_ENV: "1"}), quiet_torchrun():
            try:
                torchrun.run(args)
            except ChildFailedError as e:
                return failure(e.failures, logs)
            except SignalException:  # Ctrl-C or SIGTERM: torchrun passed it on to the workers
                return 130
        return 0
    except JobFailed as e:
        if e.output is not None:
            logs = None  # the message names a file in it: kept
        raise
    finally:
        if logs is not None:
            shutil.rmtree(logs, ignore_errors=True)


def root_cause(failures: dict) -> tuple[int, object]:
    """The failure that ended a job, from torchrun's ProcessFailure by rank (in the order it saw
    them; the processes it stopped afterwards are there too): a process killed by a signal torchrun
    does not send, else one that failed by itself, else one stopped or cut off by another's end."""
    stopped = (130, LOST_EXIT, -signal.SIGTERM, -signal.SIGINT)

    def order(item):
        f = item[1]
        return (0 if f.exitcode < 0 and f.exitcode not in stopped else 1 if f.exitcode not in stopped else 2,
                f.timestamp)

    return min(failures.items(), key=order)


def failure(failures: dict, logs: Path) -> int:
    """The exit code of a failed job: rank 0's own when it printed why (2 bad input, 130 interrupted);
    another rank's bad input raised as a CnnlabError with its line; JobFailed for anything else, with
    the last line the process wrote and where the rest is (``logs``: the launcher's log folder)."""
    rank, f = root_cause(failures)
    if f.exitcode in (2, 130) and (rank == 0 or getattr(failures.get(0), "exitcode", None) == f.exitcode):
        return f.exitcode
    log = worker_log(logs, rank)
    lines = log.read_text(errors="replace").strip().splitlines() if log is not None else []
    if f.exitcode == 2 and lines and lines[-1].startswith("error: "):
        raise CnnlabError(lines[-1].removeprefix("error: "))
    how = (f"was killed by {f.signal_name()}" if f.exitcode < 0 else
           "was interrupted (SIGTERM or Ctrl-C)" if f.exitcode == 130 else f"exited with code {f.exitcode}")
    said = f"; its last line: {lines[-1].strip()[:200]!r} (all of it: {log})" if lines else ""
    raise JobFailed(f"process rank {rank} (pid {f.pid}) {how}{said}; every process of the job stopped",
                    log if lines else None)


def worker_log(logs: Path, rank: int) -> Path | None:
    """Where torchrun put the stderr of rank ``rank`` (> 0) of a one-machine job: LOGS/RUN/attempt_N/RANK."""
    found = sorted(logs.glob(f"*/attempt_*/{rank}/stderr.log")) if rank else []
    return found[-1] if found else None


@contextlib.contextmanager
def worker_env(values: dict[str, str]):
    """Environment variables the workers inherit, for the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def quiet_torchrun():
    """torchrun's own log lines (its OMP_NUM_THREADS banner, "failed (exitcode ...)") stay out of the
    console for the block: the launcher reports a failure in one line."""
    loggers = [logging.getLogger(n) for n in ("torch.distributed.run", "torch.distributed.elastic")]
    null = logging.NullHandler()
    saved = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(null)
        lg.propagate = False
    try:
        yield
    finally:
        for lg, p in zip(loggers, saved):
            lg.removeHandler(null)
            lg.propagate = p
