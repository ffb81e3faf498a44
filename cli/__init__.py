"""The `lmfleet` command: one subcommand per module of cli/commands/ (cli/main.py builds
the parser). Nothing else in lmfleet imports this package."""
