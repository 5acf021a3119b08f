"""Where this process stands (rank, world size, device) and the process group of a run."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from polar_train.config import DeepSpeedSection
from polar_train.errors import TrainingError, UserError

T = TypeVar("T")


@dataclass
class Dist:
    """Where this process stands: rank, world size, device. ``world_size == 1`` has no group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    uses_deepspeed: bool = False

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_initialized() and self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (one small all-reduce)."""
        return bool(self.all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item())

    def decide_on_rank_zero(self, what: str, decide: Callable[[], T]) -> T:
        """``decide()`` runs on rank 0 only and every rank gets its answer (e.g. the checkpoint to
        resume from: ranks looking at a shared folder each on their own could see different ones).
        An error on rank 0 stops the other ranks too instead of leaving them waiting."""
        if self.world_size == 1:
            return decide()
        box: list[object] = [None]
        try:
            if self.rank == 0:
                box = [("ok", decide())]
        except BaseException:
            box = [("failed", None)]
            torch.distributed.broadcast_object_list(box, src=0, device=self.device)
            raise
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        status, answer = box[0]  # type: ignore[misc]
        if status != "ok":
            raise TrainingError(f"rank {self.rank}", f"rank 0 failed while {what}", "see rank 0's error above")
        return answer  # type: ignore[return-value]

    @contextlib.contextmanager
    def rank_zero_first(self, what: str) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills a cache), then the others; an error on rank 0
        stops the others too instead of leaving them waiting."""
        if self.world_size == 1:
            yield
            return
        if self.rank != 0:
            if self.any_rank(False):
                raise TrainingError(f"rank {self.rank}", f"rank 0 failed while {what}", "see rank 0's error above")
            yield
            return
        try:
            yield
        except BaseException:
            self.any_rank(True)
            raise
        self.any_rank(False)


@contextlib.contextmanager
def distributed(ds: DeepSpeedSection) -> Iterator[Dist]:
    """The process group for this run (none for one process without DeepSpeed).

    On a clean exit every rank meets at a barrier and the group is destroyed: without it 15-20%
    of gloo runs abort at interpreter teardown (SPEC 8). On an error the group is destroyed
    without a barrier (the other ranks may be gone); a lost peer becomes a ``TrainingError``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if not ds.enabled:
        if world > 1:
            raise UserError("deepspeed.enabled", f"{world} processes were launched but DeepSpeed is off",
                            "set deepspeed.enabled=true: several processes train through DeepSpeed only")
        yield Dist(device=torch.device("cuda") if cuda else torch.device("cpu"))
        return
    from polar_train.engine.deepspeed_compat import init_distributed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "RANK" not in os.environ:  # `polar-train train` alone: a world of one on a free local port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = timedelta(minutes=ds.timeout_minutes)
    init_distributed("nccl" if cuda else "gloo", timeout, attempt_store(timeout))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dist = Dist(rank, world, local_rank, torch.device("cuda", local_rank) if cuda else torch.device("cpu"), True)
    try:
        yield dist
    except (torch.distributed.DistBackendError, RuntimeError) as e:
        torch.distributed.destroy_process_group()
        if isinstance(e, torch.distributed.DistBackendError) or "gloo" in str(e).lower() or "nccl" in str(e).lower():
            raise TrainingError(f"rank {rank}", f"lost contact with another rank ({str(e).splitlines()[0]})",
                                "another process died or hung: see its error; "
                                "resume with checkpoint.resume=auto") from e
        raise
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    dist.barrier()
    torch.distributed.destroy_process_group()


ATTEMPT_STORE_KEY = "polar_train/attempt_store_port"


def attempt_store(timeout: timedelta) -> torch.distributed.Store | None:
    """A TCPStore of this launch attempt alone, hosted by rank 0; None unless torchrun shares its own.

    torchrun's c10d rendezvous (torch >= 2.5) hands the workers of EVERY attempt of a job the
    elastic agent's store (``MASTER_PORT`` is its port, ``TORCHELASTIC_USE_AGENT_STORE=True``) and
    keeps it across ``--max-restarts``, while the process group's keys carry no attempt in their
    name: after a restart a rank can read the address a dead rank of the previous attempt wrote
    there and connect to it (gloo: "connection refused", or a wait for a peer that never answers;
    NCCL reads the old unique id: pytorch#135712). DeepSpeed's CPU shm all-reduce also names its
    shared memory after ``MASTER_ADDR``/``MASTER_PORT``, which would map the dead ranks' segments.

    So rank 0 serves a fresh store on a free port and writes the port into the agent's store; the
    other ranks connect to the port they read, reading again while it is a dead attempt's (nothing
    answers there); ``MASTER_PORT`` becomes the fresh port. A restart's count is no attempt id:
    each node's agent counts its own restarts (the same pytorch issue).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    addr, rank, world = os.environ["MASTER_ADDR"], int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = torch.distributed.TCPStore(addr, int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    if rank == 0:
        store = torch.distributed.TCPStore(addr, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        agent.set(ATTEMPT_STORE_KEY, str(store.port))
    else:
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            port = int(agent.get(ATTEMPT_STORE_KEY))  # waits until the first attempt's rank 0 wrote one
            try:
                store = torch.distributed.TCPStore(addr, port, world, is_master=False, timeout=timedelta(seconds=2))
                break
            except RuntimeError:  # DistNetworkError: a dead attempt's port: rank 0 has not written yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        store.set_timeout(timeout)
    os.environ["MASTER_PORT"] = str(store.port)
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
