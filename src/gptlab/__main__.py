"""`python -m gptlab` is the `gptlab` command."""

import sys

from gptlab.cli import main

sys.exit(main())
