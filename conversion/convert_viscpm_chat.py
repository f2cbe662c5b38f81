"""Convert an original VisCPM-Chat checkpoint: ``python conversion/convert_viscpm_chat.py --help``."""

import sys

from transformers_viscpm.conversion.convert_viscpm_chat import main

if __name__ == "__main__":
    sys.exit(main())
