"""The one exception type the CLI turns into a one-line message (and a non-zero exit)."""


class KVCompileError(Exception):
    """A user-facing error: bad input, missing model, tampered artifact. Its message says what to do."""
