"""``python -m regoptim``: the ``regoptim`` command."""

from regoptim.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
