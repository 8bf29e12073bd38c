"""``python -m smpo_cli ...`` (so ``accelerate launch -m smpo_cli train ...`` works)."""

from smpo_cli.cli.main import main

if __name__ == "__main__":
    main()
