"""The one error type users see.

Anything wrong with the user's input (a missing or corrupt file, an unsupported model, a prompt too
long) is raised as PlainLlamaError with a message that names the file and the problem. The CLI prints
that message on one line and exits non-zero; any other exception is a bug in plainllama.
"""


class PlainLlamaError(Exception):
    pass
