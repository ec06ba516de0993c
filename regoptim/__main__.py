"""``python -m regoptim``: the ``regoptim`` command."""

from regoptim.workflow.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
