"""``python -m nexus_moe.cli``: the ``nexus-moe`` command."""

from nexus_moe.cli import main

if __name__ == "__main__":
    main()
