"""segstream: real-time streaming customer segmentation on Kafka and Redis."""

import os as _os

__version__ = "0.1.0"

#: Thread-pool sizes of the BLAS libraries numpy and scipy load, read when they load.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# One BLAS thread per process: a worker, its learner and the other roles each run one event
# loop on one core, and their matrices are small. With a pool per core, OpenBLAS wakes its
# threads for the larger products of a batch and they spin after each call, taking CPU
# from the broker, Redis and the processes beside them. A variable already set is kept.
for _name in BLAS_THREAD_VARIABLES:
    _os.environ.setdefault(_name, "1")

from stream.native import install as _install_native  # noqa: E402

_install_native()  # compiled hot-path modules, where built from the current source
