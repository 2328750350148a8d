"""`python -m megadrp <command> ...` (megadrp/cli.py)."""
import sys

from megadrp.cli import main

sys.exit(main())
