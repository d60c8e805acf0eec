"""Subcommands of the ``workbench`` CLI that are thin wrappers over library functions."""
