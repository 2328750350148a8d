"""`python -m megadrp.evaluate ...` = `megadrp eval ...` (megadrp/tools/evaluate.py), kept for the
scripts that call it by this name."""
import sys

from megadrp.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
