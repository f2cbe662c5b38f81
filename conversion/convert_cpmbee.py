"""Convert an original CPM-Bee checkpoint: ``python conversion/convert_cpmbee.py --help``."""

import sys

from transformers_viscpm.conversion.convert_cpmbee import main

if __name__ == "__main__":
    sys.exit(main())
