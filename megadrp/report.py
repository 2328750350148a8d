"""`python -m megadrp.report ...` = `megadrp report ...` (megadrp/tools/report.py), kept for the
scripts that call it by this name."""
import sys

from megadrp.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
