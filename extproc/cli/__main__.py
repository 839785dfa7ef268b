"""`python -m extproc.cli`: how `up`, `demo` and the tests start a command with the interpreter they run on."""

import sys

from extproc.cli import main

if __name__ == "__main__":
    sys.exit(main())
