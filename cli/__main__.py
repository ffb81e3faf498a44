"""`python -m lmfleet.cli ...` is the `lmfleet` command."""

import sys

from lmfleet.cli.main import main

sys.exit(main())
