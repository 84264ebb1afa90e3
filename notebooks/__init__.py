"""Notebooks shipped with cellblock (the quickstart is the default for `cellblock run`)."""
