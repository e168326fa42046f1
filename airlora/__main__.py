"""``python -m airlora``: the ``airlora`` command, as launchers run it (torchrun or accelerate launch -m airlora)."""

import sys

from airlora.cli import main

if __name__ == "__main__":  # not on a plain import (a test imports every submodule)
    sys.exit(main())
