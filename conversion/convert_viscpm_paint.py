"""Convert an original VisCPM-Paint checkpoint: ``python conversion/convert_viscpm_paint.py --help``."""

import sys

from transformers_viscpm.conversion.convert_viscpm_paint import main

if __name__ == "__main__":
    sys.exit(main())
