"""One rank of `viscpm finetune` under torchrun (tests/test_finetune.py): runs the real entry point, then writes this
rank's view of the trained weights (a checksum per parameter) to `<report folder>/rank<R>.json`."""

import json
import os
import sys
from pathlib import Path

from transformers_viscpm.finetune import run

if __name__ == "__main__":
    report, argv = Path(sys.argv[1]), sys.argv[2:]
    trainer = run(argv)
    sums = {name: float(p.detach().double().sum()) for name, p in trainer.model.named_parameters()}
    (report / f"rank{os.environ['RANK']}.json").write_text(json.dumps(sums))
