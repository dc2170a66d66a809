"""The one exception type that carries a user-facing message.

Library code raises ``CnnlabError("what is wrong; how to fix it")`` for bad input. The CLI prints
the message as one line and exits non-zero; it never shows a traceback for these.
"""


class CnnlabError(Exception):
    """Bad input or a missing resource, with a one-line message naming the problem and the fix."""
