"""One exception type for every user-facing error (docs/design.md §12).

Messages name the file or field at fault and what to do about it; the CLI prints them without a
traceback.
"""


class NexusError(Exception):
    """A problem with the user's input, files or configuration, explained in the message."""
