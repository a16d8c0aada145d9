"""`python -m badger_runtime.cli ...` (the same as `badger ...`)."""

import sys

from . import main

sys.exit(main())
