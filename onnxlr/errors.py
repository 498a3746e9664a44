"""The one exception type for user errors.

An ``OnnxlrError`` is a problem with the user's input or options: the CLI prints its message as one
line on stderr and exits with status 2, without a traceback. Anything else is a bug in onnxlr and
keeps its traceback.
"""


class OnnxlrError(Exception):
    """A user error: bad model file, bad option, unavailable provider. Message says what to do."""
