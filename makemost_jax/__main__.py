"""`python3 -m makemost_jax ...` runs the `makemost` command (no PATH needed)."""

from makemost_jax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
