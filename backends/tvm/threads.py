"""TVM's CPU thread pool, configured by the library so a compiled model uses every core without user set-up.

Why: TVM's runtime sizes its pool on first use from ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``), else from
``hardware_concurrency() / 2`` on x86 (it assumes hyper-threading). On a 2-core machine without the variable a compiled
model ran on one core (torchvision resnet18: 45.3 ms instead of 26.5 ms). ``runtime.config_threadpool`` fixes it,
with two facts of TVM 0.27's runtime (src/runtime/thread_pool.cc) shaping how we call it:

- the pool and its size limit are *thread-local*: each Python thread that runs a model has its own pool, so the
  pool is configured in the calling thread, once per thread and thread count;
- a pool's worker count is fixed when it is created, and ``config_threadpool(mode, n, cpus)`` first sets the limit to
  ``len(cpus)``: configuring before the first parallel call creates a pool with one worker per usable CPU, and ``n``
  chooses how many of them run (so ``threads`` can change later without recreating the pool).

Mode ``kSpecifyThreadShareAllCore`` (-3) lets every worker run on every CPU of the process's affinity mask (no
pinning, so other libraries' threads are not starved). A user's ``TVM_NUM_THREADS`` / ``OMP_NUM_THREADS`` always wins:
then we leave the pool alone.
"""

from __future__ import annotations

import logging
import os
import threading

import tvm

log = logging.getLogger(__name__)

_SHARE_ALL_CORES = -3  # tvm::runtime::threading::ThreadGroup::kSpecifyThreadShareAllCore
_ENV_VARIABLES = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")
_configured = threading.local()  # the thread count this thread's TVM pool was last set to


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def default_threads() -> int:
    """One thread per physical core the process may use: compute-bound kernels gain nothing from a core's second
    hardware thread (the same default as ONNX Runtime's intra-op pool)."""
    import psutil

    cpus = len(usable_cpus())
    physical = psutil.cpu_count(logical=False) or cpus
    logical = psutil.cpu_count(logical=True) or cpus
    per_core = max(logical // physical, 1)  # hardware threads per core
    return max(cpus // per_core, 1)


def user_override() -> str | None:
    """The environment variable that sizes TVM's pool, if the user set one."""
    return next((name for name in _ENV_VARIABLES if os.environ.get(name)), None)


def check_threads(threads: int | None) -> int | None:
    """Validate a ``threads=`` argument (None = the default): a positive integer."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None (all physical cores), got {threads!r}")
    return threads


def configure_threads(threads: int | None = None) -> int:
    """Size the calling thread's TVM pool to ``threads`` (None: ``default_threads()``, at most the usable CPUs);
    return the count in use.

    Cheap after the first call in a thread (a thread-local compare). Does nothing when the user set
    ``TVM_NUM_THREADS``/``OMP_NUM_THREADS``.
    """
    if getattr(_configured, "request", ()) == (threads,):  # every call after the first: one thread-local compare
        return _configured.threads                        # (no environment lookups either)
    if user_override() is not None:
        return tvm.runtime.num_threads()
    cpus = usable_cpus()
    wanted = min(check_threads(threads) or default_threads(), len(cpus))  # more threads than CPUs only contend
    config = tvm.get_global_func("runtime.config_threadpool")
    config(_SHARE_ALL_CORES, wanted, [str(c) for c in cpus])
    used = tvm.runtime.num_threads()
    if used < wanted:  # this thread's pool existed before we configured it: its worker count cannot grow
        log.warning("TVM's thread pool in this thread was created earlier with %d worker(s); compiled models run "
                    "on %d of the %d threads asked for (run them from a thread that has not run TVM code yet, or "
                    "set TVM_NUM_THREADS)", used, used, wanted)
    _configured.request, _configured.threads = (threads,), used
    return used
