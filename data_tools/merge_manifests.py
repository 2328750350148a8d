"""`python data_tools/merge_manifests.py ...` = `megadrp merge ...` (megadrp/tools/merge_manifests.py), kept for the
scripts that call it by path. Needs megadrp installed (`pip install -e .`)."""
import sys

from megadrp.tools.merge_manifests import main

if __name__ == "__main__":
    sys.exit(main())
