"""`python -m transformers_viscpm` runs the `viscpm` command line."""

import sys

from .cli import main

sys.exit(main())
