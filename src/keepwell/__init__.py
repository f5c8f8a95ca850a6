"""keepwell: deduplicated, compressed, encrypted, verifiable backups of files and databases."""

import os as _os

# numpy (which sorts large indexes) needs no BLAS; OpenBLAS would otherwise start a thread per
# core at import and spin them, taking CPU from the pipeline
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
