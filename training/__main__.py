"""`python -m training ...` == `python -m cdlm.training ...` (torchrun and accelerate too)."""

import sys

from cdlm.training.__main__ import main

if __name__ == "__main__":
    main(sys.argv[1:])
