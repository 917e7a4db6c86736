"""``python -m gradwatch``: the same as the ``gradwatch`` command."""

from gradwatch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
