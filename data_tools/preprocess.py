"""`python data_tools/preprocess.py ...` = `megadrp preprocess ...` (megadrp/tools/preprocess.py), kept for the
scripts that call it by path. Needs megadrp installed (`pip install -e .`)."""
import sys

from megadrp.tools.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
