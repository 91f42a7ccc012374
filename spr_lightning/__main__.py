"""``python -m spr_lightning {fit,validate,test,predict} --config FILE.yaml``."""

from spr_lightning.cli import cli_main

if __name__ == "__main__":
    cli_main()
