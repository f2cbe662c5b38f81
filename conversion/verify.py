"""Check a converted repo against the original: ``python conversion/verify.py --help``."""

import sys

from transformers_viscpm.conversion.verify import main

if __name__ == "__main__":
    sys.exit(main())
