"""The one exception type users see.

Anything that is the user's fault (a bad argument, a missing file, a checkpoint of the wrong kind)
raises `DrpError` with one sentence saying what was wrong and what to do. The command-line tools
catch it, print the sentence and exit with status 1, without a traceback.
"""


class DrpError(Exception):
    """A problem with the user's input, stated in one sentence."""
