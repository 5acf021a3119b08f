"""Where this process stands (rank, world size, device) and the process group of a run."""

from __future__ import annotations

import contextlib
import os
import socket
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
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if cuda:
        torch.cuda.set_device(local_rank)
    init_distributed("nccl" if cuda else "gloo", timedelta(minutes=ds.timeout_minutes))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dist = Dist(rank, world, local_rank, torch.device("cuda", local_rank) if cuda else torch.device("cpu"), True)
    try:
        yield dist
    except (torch.distributed.DistBackendError, RuntimeError) as e:
        torch.distributed.destroy_process_group()
        if isinstance(e, torch.distributed.DistBackendError) or "gloo" in str(e).lower() or "nccl" in str(e).lower():
            raise TrainingError(f"rank {rank}", f"lost contact with another rank ({str(e).splitlines()[0]})",
                                "another process died or hung: see its error; resume with checkpoint.resume=auto") from e
        raise
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    dist.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
