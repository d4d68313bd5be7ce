"""`python -m trainer_lib ...` (and `accelerate launch -m trainer_lib ...`): the trainer-lib CLI."""

import sys

from trainer_lib.cli import main

if __name__ == "__main__":
    sys.exit(main())
