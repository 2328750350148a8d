"""`python -m megadrp.demo ...` = `megadrp demo ...` (megadrp/tools/demo.py), kept for the
scripts that call it by this name."""
import sys

from megadrp.tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
