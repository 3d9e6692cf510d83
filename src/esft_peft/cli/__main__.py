"""``python -m esft_peft.cli``: the command line (used by ``accelerate launch -m esft_peft.cli``)."""

import sys

from .main import main

sys.exit(main())
