"""`python -m monoscope ...` (and `torchrun ... -m monoscope ...`) = the `monoscope` command."""

import sys

from monoscope.cli import main

if __name__ == "__main__":
    sys.exit(main())
