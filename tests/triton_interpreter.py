"""Run the Triton kernels on the CPU: Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are
first imported; conftest imports this module), with its scan over user-defined combine functions
vectorised.

The interpreter's own generic scan calls the combine function once per element of the whole block (a
(16, 8, 32) block: 4,096 Python calls per chunk), which makes a scan of 1,025 steps take minutes. The
replacement calls it once per position along the scanned axis on whole slices, the same combine in the
same order, so the kernels' arithmetic is unchanged and the tests take seconds.
"""
import os

import numpy as np

os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from triton.runtime import interpreter
except ImportError:  # tests that need Triton skip themselves (see test_triton_scan.py)
    interpreter = None


def _sliced_scan(self, inputs):
    """ScanOps.generic_scan, one combine call per step along the axis instead of per element."""
    data = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in inputs]
    outputs = [np.empty_like(d) for d in data]
    acc = None
    for i in range(data[0].shape[0]):
        current = tuple(self.to_tensor(np.ascontiguousarray(d[i]), arg.dtype) for d, arg in zip(data, inputs))
        if acc is None:
            acc = current
        else:
            combined = self.combine_fn.fn(*acc, *current)
            acc = combined if isinstance(combined, tuple) else (combined,)
        for out, value in zip(outputs, acc):
            out[i] = value.handle.data
    return [self.to_tensor(np.ascontiguousarray(np.moveaxis(out, 0, self.axis)), arg.dtype)
            for out, arg in zip(outputs, inputs)]


if interpreter is not None:
    interpreter.ScanOps.generic_scan = _sliced_scan
