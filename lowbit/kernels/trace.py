"""Device kernels a call starts, counted on the CPU under Triton's interpreter.

A CUDA call pays a launch for every Triton kernel and every torch op that runs a kernel; under the
interpreter (TRITON_INTERPRET=1) both are visible: Triton launches go through the interpreter's grid
executor, torch ops through a dispatch mode. Views and allocations start no kernel.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = ("empty", "empty_strided", "empty_like")


def count_launches(fn: Callable[[], object]) -> int:
    """Device kernels fn() would start: Triton launches plus torch ops that are not views or allocations.

    Needs the interpreter (TRITON_INTERPRET=1 before triton is imported); torch ops the interpreter runs
    inside a Triton launch are not counted.
    """
    import triton.runtime.interpreter as interp

    count, inside = [0], [False]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL:
                count[0] += 1
            return func(*args, **(kwargs or {}))

    launch = interp.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        count[0] += 1
        inside[0] = True
        try:
            return launch(self, *args, **kwargs)
        finally:
            inside[0] = False

    interp.GridExecutor.__call__ = counted
    try:
        with Count():
            fn()
    finally:
        interp.GridExecutor.__call__ = launch
    return count[0]
