"""`python data_tools/debian_corpus.py ...` = `megadrp debian-corpus ...` (megadrp/tools/debian_corpus.py), kept for the
scripts that call it by path. Needs megadrp installed (`pip install -e .`)."""
import sys

from megadrp.tools.debian_corpus import main

if __name__ == "__main__":
    sys.exit(main())
