"""Processes and sharding: one code path for one process, DDP and FSDP (nanochat's compute_init).

    d = compute_init()                       # under torchrun: joins the group (NCCL on GPUs, gloo on CPU)
    module = wrap(LlavaForTraining(model), d, fsdp=False)
    with grad_sync(module, last_micro_batch): loss.backward()
    state = full_model_state(module, d)      # FSDP: gathered (a collective: every rank calls it)

DDP keeps a full copy of the model per process; FSDP (`--fsdp`, PyTorch's fully_shard) shards
every LLM and CLIP layer and the rest of the model across processes, for LLMs that do not fit one
GPU with their optimizer state. Both average gradients over processes.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import TrainConfigError
from .model import parts


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def compute_init(threads: int = 0) -> Dist:
    """Under torchrun (RANK set, WORLD_SIZE > 1) join the process group; else one process."""
    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        return Dist(dist.get_rank(), dist.get_world_size(), local, device)
    return Dist(0, 1, 0, torch.device("cuda" if cuda else "cpu"))


def compute_cleanup(d: Dist) -> None:
    if d.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()


def all_sum(d: Dist, x: float) -> float:
    if not d.distributed:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def is_fsdp(module: nn.Module) -> bool:
    return hasattr(module, "set_requires_gradient_sync")


def wrap(module: nn.Module, d: Dist, *, fsdp: bool) -> nn.Module:
    """DDP or FSDP around the training module (`LlavaForTraining`); unchanged for one process."""
    if fsdp:
        if not d.distributed:
            raise TrainConfigError("--fsdp shards over processes: launch with torchrun --nproc_per_node N (N >= 2)")
        from torch.distributed.fsdp import fully_shard
        vision, _, lm = parts(module.llava)
        clip = getattr(vision, "vision_model", vision)   # transformers 5 keeps CLIPVisionModel flat
        for layer in list(lm.layers) + list(clip.encoder.layers):
            fully_shard(layer)
        fully_shard(module)           # the rest: embeddings (tied LM head), projector, norms
        return module
    if d.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return module


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool):
    """Gradient accumulation: reduce gradients over processes only on the last micro-batch."""
    if is_fsdp(module):
        module.set_requires_gradient_sync(enabled)
        yield
    elif enabled or not hasattr(module, "no_sync"):
        yield
    else:
        with module.no_sync():
            yield


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(module: nn.Module, d: Dist) -> dict[str, torch.Tensor] | None:
    """FSDP: the whole model's state dict, gathered (every rank must call this), keyed like the
    llava model's own; None when the model is not sharded (read it directly)."""
    if not is_fsdp(module):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    sd = get_model_state_dict(module, options=_options())
    return {k.removeprefix("llava."): v for k, v in sd.items()}


def optimizer_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict (FSDP: gathered, keyed by parameter name; a collective)."""
    if not is_fsdp(module):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(module, opt, options=_options())


def load_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    if not is_fsdp(module):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(module, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
