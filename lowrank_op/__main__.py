"""``python -m lowrank_op COMMAND ...``: see :mod:`lowrank_op.cli`."""

import sys

from lowrank_op.cli import main

sys.exit(main())
