"""``make bench-gpu``: speed and memory of the whole stack on one device, beside the reference pipeline.

See :mod:`devtools.bench_gpu.orchestrate` for what one run measures and writes.
"""
