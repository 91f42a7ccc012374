"""``python -m spr_lightning.tiny OUT_DIR [--seed N] [--only NAME ...]``."""

from spr_lightning.tiny.build import main

if __name__ == "__main__":
    raise SystemExit(main())
