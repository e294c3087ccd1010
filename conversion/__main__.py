"""`python -m modeling_nbp.conversion --generator CKPT --tokenizer PT --output DIR` (same as `nbp convert`)."""

import sys

from .cli import main

sys.exit(main())
