"""Errors a user can act on. The CLI prints them without a traceback and exits non-zero."""

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input: the message names the file (if any) and what is wrong with it."""

    def __init__(self, message: str, path=None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
