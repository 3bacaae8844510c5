"""``python -m lowrank_op COMMAND ...``: see :mod:`lowrank_op.circuits.cli`."""

import sys

from lowrank_op.circuits.cli import main

sys.exit(main())
