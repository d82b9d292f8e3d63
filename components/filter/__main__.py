"""`python -m components.filter SRC OUT [--preset NAME] [--set KEY=VALUE ...]`: the same as `clipflow filter`."""

import sys

from pipelines.cli import main

sys.exit(main(["filter", *sys.argv[1:]]))
