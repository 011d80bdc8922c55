"""`python -m slsd_cli ...` and `torchrun -m slsd_cli ...` run the same CLI as `slsd`."""

import sys

from slsd_cli.cli import main

sys.exit(main())
