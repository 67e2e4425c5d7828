"""megatron-core's torch_dist checkpoint writer: its helper process, started before training.

megatron-core's ``FileSystemWriterAsync`` creates, at a run's first save, a ``multiprocessing`` Manager in a
*spawn* context (the results queue of its write processes). Started there it has two costs:

* a spawned process re-imports the parent's ``__main__``: the training script (Megatron-LM's ``pretrain_gpt.py``
  under ``runpy``: all of ``megatron.training`` again; a 2-rank CPU run's first save took 20 s instead of 8 s,
  minutes on a loaded machine) or the ``megatron-bottleneck`` console script (megatron-core again, about 6 s of
  CPU per rank). The helper needs none of it: it is started here with ``__main__`` hidden;
* it inherits the signal handlers of the moment: a preemption signal sent to every process of the job (Slurm,
  or torchrun forwarding it) kills it in the middle of the very save the signal asked for (EOFError).

:func:`start_writer_helpers` starts it early, with SIGUSR1 and SIGTERM ignored and no main module to import.
The queue is megatron-core's own (its module caches it), so the first save finds it.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import types

from megatron.core.dist_checkpointing.strategies import filesystem_async


@contextlib.contextmanager
def _main_module_hidden():
    """``sys.modules["__main__"]`` replaced by an empty module for the duration: a process that multiprocessing
    spawns then imports no main module (it re-imports ``__main__`` from its ``__spec__`` or ``__file__``, and the
    empty module has neither). Main thread only; restored on exit."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is None:
            sys.modules.pop("__main__", None)
        else:
            sys.modules["__main__"] = main


def start_writer_helpers() -> bool:
    """Start the helper process of megatron-core's checkpoint writer now, with SIGUSR1 and SIGTERM ignored so
    that it inherits that. Call it before training (before a training script runs), from the main thread.
    Returns whether it started one (False: already started, not the main thread, or a megatron-core without
    the queue, which then starts its own at the first save)."""
    make = getattr(filesystem_async, "get_write_results_queue", None) or getattr(  # 0.19 / 0.16
        filesystem_async, "_get_write_results_queue", None)
    if make is None or getattr(filesystem_async, "_results_queue", None) is not None:
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        with _main_module_hidden():
            make()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return True
