# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Memory: how much a training pass needs, how much the device has, how to split.

A training step runs rows = members × prompts copies of the segment (source -> target
blocks) and keeps their activations for the backward pass. Per row and block that is
about (16·d_model + 2·d_mlp)·pos activation elements (residual, layer norms, q/k/v/z,
attention output, MLP in/out; Korthikanti et al. 2022, "Reducing Activation
Recomputation", without dropout masks) in the model's dtype, plus 3·n_heads·pos²
attention scores / pattern elements in fp32 (TransformerLens upcasts them). The
estimate is checked against the measured peak in `tests/core/test_memory.py`; it is an
estimate, so `rows_per_pass("auto")` keeps a safety margin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from melbo_lens.core.host import Host, d_model_of

__all__ = ["PassMemory", "free_bytes", "pass_memory", "rows_per_pass", "peak_bytes"]

GiB = 1024**3


@dataclass(frozen=True)
class PassMemory:
    """Estimated activation bytes of one row of one training pass."""

    per_row: int
    n_blocks: int
    positions: int

    def bytes_for(self, rows: int) -> int:
        return self.per_row * rows


def pass_memory(model: Host, n_blocks: int, positions: int) -> PassMemory:
    """Activation bytes per row of a forward+backward pass through `n_blocks` blocks."""
    cfg = model.cfg
    d_model = d_model_of(model)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d_model)
    n_heads = int(getattr(cfg, "n_heads", 1) or 1)
    dtype = getattr(cfg, "dtype", torch.float32)
    element = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    per_block = (16 * d_model + 2 * d_mlp) * positions * element
    per_block += 3 * n_heads * positions * positions * 4
    return PassMemory(per_row=max(1, n_blocks) * per_block, n_blocks=n_blocks, positions=positions)


def free_bytes(device: torch.device | str) -> int:
    """Memory free for new tensors on `device`: the CUDA allocator's free memory plus
    what it caches, or the host's MemAvailable on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + reserved)
    available = _proc_kib("/proc/meminfo", "MemAvailable:")
    if available is not None:
        return available * 1024
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 0


def rows_per_pass(
    memory: PassMemory, rows: int, requested: int | str | None, device: torch.device | str
) -> int | None:
    """The row limit of one pass: `requested` (an int), or with `"auto"` the most rows
    that fit in 60% of the free memory; None when every row fits in one pass.

    Raises MemoryError, before anything runs, when even one row does not fit, or when a
    requested limit (or one unsplit pass) needs more than is free: the message says how
    much is needed and which knob lowers it.
    """
    free = free_bytes(device)
    budget = int(0.6 * free)
    if requested == "auto":
        if memory.per_row > budget > 0:
            raise MemoryError(_too_big(memory, 1, free, device))
        fit = budget // memory.per_row if budget > 0 else rows
        return None if fit >= rows else max(1, int(fit))
    limit = rows if requested is None else min(int(requested), rows)
    if free > 0 and memory.bytes_for(limit) > free:
        raise MemoryError(_too_big(memory, limit, free, device))
    return None if limit >= rows else limit


def _too_big(memory: PassMemory, rows: int, free: int, device: Any) -> str:
    need = memory.bytes_for(rows)
    fit = max(0, int(0.6 * free) // memory.per_row)
    fix = (
        f"pass max_rows_per_pass={fit} or 'auto' (--max-rows-per-pass on the command line)"
        if fit >= 1
        else "shorten the prompts, move the source and target closer, or use a device with "
        "more memory (one row alone does not fit)"
    )
    return (
        f"one training pass needs about {need / GiB:.2f} GiB of activations ({rows} rows = "
        f"vectors x prompts, {memory.positions} positions, {memory.n_blocks} blocks, "
        f"{memory.per_row / 2**20:.1f} MiB per row) but only {free / GiB:.2f} GiB is free on "
        f"{device}; {fix}"
    )


def peak_bytes(device: torch.device | str) -> int:
    """Peak memory so far: `torch.cuda.max_memory_allocated` on a GPU; on CPU the
    process's peak resident set (`VmHWM` of /proc/self/status: `ru_maxrss` is not used
    where avoidable, as Linux carries it over from the parent across fork and exec)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = _proc_kib("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _proc_kib(path: str, key: str) -> int | None:
    """The kB value of the line starting with `key` in a /proc file (None if absent)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
