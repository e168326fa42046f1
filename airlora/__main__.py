"""``python -m airlora``: the ``airlora`` command, as launchers run it (torchrun or accelerate launch -m airlora)."""

import sys

from airlora.cli import main

sys.exit(main())
