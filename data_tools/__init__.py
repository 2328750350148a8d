"""Command-line tools that turn domain corpora into megadrp's indexed shards."""
