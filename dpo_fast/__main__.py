"""``python -m dpo_fast ...``: the same as the ``dpo-fast`` console command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
