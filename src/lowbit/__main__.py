"""``python -m lowbit`` (and ``torchrun --nproc-per-node N -m lowbit train RECIPE``): the ``lowbit`` command."""

import sys

from lowbit.cli import main

sys.exit(main())
