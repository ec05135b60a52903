"""A CPU threadpool that lives as long as the worker's context, as llama-server attaches one.

Without an attached pool, ggml's CPU backend makes a disposable one for every graph it computes. In a
build without OpenMP (clang on macOS, for one) that pool's threads are started and joined for every written
token; llama-server (common_init_from_params) attaches a pool whose threads stay and poll briefly for the
next graph. With OpenMP (this Linux build, and llama-server's beside it) the threads are OpenMP's either
way and the pool holds only ggml's settings: the bridge then computes exactly as llama-server does.
llama-cpp-python 0.3.36 binds neither side, so both are bound here: the pool's functions through the CPU
backend's registry (as llama.cpp's common code finds them), the attachment on libllama.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_lib

from ..devices import ggml

GGML_MAX_N_THREADS = 512


class _Params(C.Structure):
    """struct ggml_threadpool_params (ggml.h)."""

    _fields_ = [("cpumask", C.c_bool * GGML_MAX_N_THREADS), ("n_threads", C.c_int), ("prio", C.c_int),
                ("poll", C.c_uint32), ("strict_cpu", C.c_bool), ("paused", C.c_bool)]


_NEW = C.CFUNCTYPE(C.c_void_p, C.POINTER(_Params))
_FREE = C.CFUNCTYPE(None, C.c_void_p)


@dataclass
class ThreadPools:
    """The pools attached to one context (one, or a batch pool beside a paused one, as llama.cpp's common
    code makes them when the thread counts differ); `free()` after the context is freed."""

    pools: list[int]
    _free: Any

    def free(self) -> None:
        for pool in self.pools:
            self._free(pool)
        self.pools = []


def attach(ctx: llama_cpp.llama_context_p, n_threads: int, n_threads_batch: int) -> ThreadPools | None:
    """Attach pools of `n_threads` (single tokens) and `n_threads_batch` (prompt batches) to `ctx`; None
    when this build's CPU backend offers no pools (the context then keeps making its own)."""
    _bound()
    lib = ggml.lib()
    cpu = lib.ggml_backend_dev_by_type(ggml.CPU_KIND)
    if not cpu:
        return None
    reg = lib.ggml_backend_dev_backend_reg(cpu)
    new_at = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new")
    free_at = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_free")
    if not new_at or not free_at:
        return None
    new, free = _NEW(new_at), _FREE(free_at)
    pools = ThreadPools([], free)
    batch = None
    if n_threads_batch != n_threads:
        batch = new(C.byref(_params(n_threads_batch)))
        if not batch:
            return None
        pools.pools.append(batch)
    single = new(C.byref(_params(n_threads, paused=batch is not None)))
    if not single:
        pools.free()
        return None
    pools.pools.append(single)
    _bound().llama_attach_threadpool(ctx, single, batch)
    return pools


def detach(ctx: llama_cpp.llama_context_p) -> None:
    _bound().llama_detach_threadpool(ctx)


def _params(n_threads: int, paused: bool = False) -> _Params:
    params = _Params()
    ggml.lib().ggml_threadpool_params_init(C.byref(params), n_threads)  # ggml's defaults: poll 50
    params.paused = paused
    return params


@lru_cache(maxsize=1)
def _bound() -> Any:
    lib = llama_lib._lib
    lib.llama_attach_threadpool.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p]
    lib.llama_attach_threadpool.restype = None
    lib.llama_detach_threadpool.argtypes = [C.c_void_p]
    lib.llama_detach_threadpool.restype = None
    ggml.lib().ggml_threadpool_params_init.argtypes = [C.POINTER(_Params), C.c_int]
    ggml.lib().ggml_threadpool_params_init.restype = None
    return lib
