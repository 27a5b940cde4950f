"""``python -m devtools.bench_gpu``: see :mod:`devtools.bench_gpu.orchestrate`."""

import sys

from devtools.bench_gpu.orchestrate import main

if __name__ == "__main__":
    sys.exit(main())
