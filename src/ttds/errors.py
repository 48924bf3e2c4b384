"""One exception type for user mistakes: the CLI prints its message as one line and exits 2."""


class TTDSError(Exception):
    """A user-facing error: bad input, a missing file or model, an invalid setting.

    The message must name the file / field / key and what was expected.
    """
