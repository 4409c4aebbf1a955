"""One exception type for bad input: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """A problem with what the user gave us (paths, flags, files). The message is one clear line."""
