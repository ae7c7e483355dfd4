"""The one exception type for a user's mistake.

Commands raise :class:`UsageError` with a single sentence that says what is wrong and what to do;
the CLI prints it on one line and exits with status 2, without a traceback.
"""


class UsageError(Exception):
    """A mistake in the user's input (config, paths, data, checkpoints), not a bug."""
