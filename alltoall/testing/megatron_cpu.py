"""Megatron-Core's MoE dispatchers on CPU ranks, for the tests and the
bench: what its CUDA-only steps need in their place. Imported only by
tests and bench scripts, never by the library."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def host_splits_alltoall() -> type:
    """Megatron's ``MoEAlltoAllTokenDispatcher`` as it runs on CPUs.

    Its dropless path copies the split sizes to the host on a CUDA side
    stream (``maybe_move_tensor_to_cpu(as_numpy=True)``); without CUDA the
    subclass turns them into the same numpy arrays at the same point. Every
    other step is Megatron's own. With CUDA, the class itself."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if torch.cuda.is_available():
        return MoEAlltoAllTokenDispatcher
    if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "no CUDA: the split sizes are made host arrays here"

    class HostSplitsAlltoAll(MoEAlltoAllTokenDispatcher):
        def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
            if not self.drop_and_pad and point == self.cuda_dtoh_point:
                for name in ("input_splits", "output_splits", "output_splits_tp"):
                    value = getattr(self, name)
                    if torch.is_tensor(value):
                        setattr(self, name, value.numpy())
            return tokens_per_expert

    return HostSplitsAlltoAll


@contextlib.contextmanager
def cpu_as_current_device() -> Iterator[None]:
    """Megatron's uneven all-to-all (tensor_parallel.all_to_all) allocates its
    output on ``torch.cuda.current_device()``; CPU-only torch has none."""
    saved = torch.cuda.current_device
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.current_device = saved


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Runs torch.compile'd functions (the flex dispatcher's preprocess) eagerly."""
    import torch._dynamo

    saved = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = saved
