"""A plugin whose import fails, as one with a missing compiled extension would."""

raise ImportError("libfake_kernels.so: cannot open shared object file")
