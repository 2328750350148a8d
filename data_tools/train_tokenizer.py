"""`python data_tools/train_tokenizer.py ...` = `megadrp tokenizer ...` (megadrp/tools/train_tokenizer.py), kept for the
scripts that call it by path. Needs megadrp installed (`pip install -e .`)."""
import sys

from megadrp.tools.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
