"""CPU performance paths of the ops, one module per op (``kernels/cpu/<op>.py``).

What a training step runs on a CPU while ``kernels.cpu_fast_paths`` is on (the trainer opts in): the
same results as the op's torch specification (``kernels.<op>.<op>_torch``) up to rounding,
organised for speed (gradient buffer donation from :mod:`kernels.buffers`, dense-GEMM switches
for codes that name few features, cache-sized chunks, sampled products). Nothing here is
needed to read what an op computes.
"""
