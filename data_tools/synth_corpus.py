"""`python data_tools/synth_corpus.py ...` = `megadrp synth-corpus ...` (megadrp/tools/synth_corpus.py), kept for the
scripts that call it by path. Needs megadrp installed (`pip install -e .`)."""
import sys

from megadrp.tools.synth_corpus import main

if __name__ == "__main__":
    sys.exit(main())
