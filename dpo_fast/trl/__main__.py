"""``python -m dpo_fast.trl script.py [args...]``: runs a TRL script unchanged, with
``trl.DPOTrainer`` / ``trl.DPOConfig`` replaced by dpo_fast's drop-in (:func:`dpo_fast.trl.patch`).
The script sees ``sys.argv`` as if it had been started itself (``accelerate launch -m
dpo_fast.trl script.py ...`` works the same way)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    script = Path(argv[0])
    if not script.is_file():
        raise SystemExit(f"python -m dpo_fast.trl: no script {str(script)!r}")
    from . import patch

    patch()
    sys.argv = [str(script)] + argv[1:]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
