"""`python -m align ...` (and `accelerate launch -m align stage ...`)."""

import sys

from align.cli import main

sys.exit(main())
