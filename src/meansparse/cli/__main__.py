"""``python -m meansparse.cli``: the ``meansparse`` command, for launchers such as ``torchrun -m``."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
