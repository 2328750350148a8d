"""`python data_tools/inspect_data.py ...` = `megadrp inspect ...` (megadrp/tools/inspect_data.py), kept for the
scripts that call it by path. Needs megadrp installed (`pip install -e .`)."""
import sys

from megadrp.tools.inspect_data import main

if __name__ == "__main__":
    sys.exit(main())
