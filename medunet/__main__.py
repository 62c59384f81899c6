"""``python -m medunet`` (and ``torchrun -m medunet``) run the command line."""

import sys

from medunet.cli import main

sys.exit(main())
