"""Host-side settings for training on the CPU.

``keep_freed_memory()``: XLA:CPU allocates a compiled step's temporaries as one buffer on every
call (the twin GPT's LoRA step of the main example: 47.7 MB). glibc's malloc maps any
allocation above its mmap threshold (adaptive, at most 32 MiB by default) with a fresh ``mmap``
and unmaps it when freed, so each step faulted in and zeroed about 11.7k new pages: 25 ms of
kernel time, over a quarter of the step's CPU time on one core (benchmarks/README.md, "Fourth
attempt"). Keeping freed memory in the heap removes those faults for every engine in the
process (torch's steps gain too).
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["KEEP_BYTES", "keep_freed_memory"]

KEEP_BYTES = 1 << 30  # allocations up to 1 GiB come from (and freed memory stays in) the heap
# mallopt's value is a C int: ctypes would pass a larger limit masked to 32 bits (1 << 40 as
# 0: every allocation mapped afresh, the opposite of what was asked) and glibc would accept it.
_MAX_LIMIT = (1 << 31) - 1


def keep_freed_memory(limit: int = KEEP_BYTES) -> bool:
    """Has glibc's malloc serve allocations of up to ``limit`` bytes from its heap and keep
    freed memory for reuse, instead of mapping every large allocation afresh and unmapping it
    when freed. Process-wide (every library's allocations); the process then keeps up to
    ``limit`` bytes of freed memory. Returns whether it was applied: only under glibc (not on
    macOS, Windows or musl), and only if glibc accepted all three settings. A ``limit`` that
    is not an int in [1, 2**31 - 1] (mallopt's C int) is a ``ValueError``, before any setting.

    Call it before JAX first runs anything (before XLA:CPU starts its threads): it also puts
    every thread on glibc's main heap (one arena), since a thread that already has an arena of
    its own (at most 64 MiB a heap) would still map such buffers afresh. From the shell
    instead, before the process starts: ``GLIBC_TUNABLES`` with
    ``glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824``.
    """
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        raise ValueError(f"keep_freed_memory: limit must be a positive int, got {limit!r}")
    if limit > _MAX_LIMIT:
        raise ValueError(
            f"keep_freed_memory: limit must be at most {_MAX_LIMIT} bytes (glibc's mallopt "
            f"takes a C int), got {limit!r}"
        )
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's <malloc.h>
    # trim first: a heap that keeps freed memory is harmless on its own
    settings = ((m_trim_threshold, limit), (m_arena_max, 1), (m_mmap_threshold, limit))
    return all(libc.mallopt(option, value) for option, value in settings)
