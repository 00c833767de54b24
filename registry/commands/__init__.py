"""Subcommands of the ``llavakit`` command line, one module each (see :mod:`llavakit.registry.cli`)."""
