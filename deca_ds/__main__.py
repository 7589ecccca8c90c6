"""``python -m deca_ds``: the ``deca-ds`` command, also for launchers that start modules
(``deepspeed --module deca_ds run ...``, ``torchrun -m deca_ds run ...``)."""

import sys

from deca_ds.cli import main

sys.exit(main())
