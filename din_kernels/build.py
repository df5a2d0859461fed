"""``python -m din_kernels.build``: compile the C++ CPU op into the cache now (``make setup`` runs it), rather
than on the first CPU call. See ``din_kernels.cpu_extension``."""
import sys

from .cpu_extension import main

if __name__ == "__main__":
    sys.exit(main())
