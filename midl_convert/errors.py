"""The one exception type users see: its message names the problem and the fix."""


class MIDLError(ValueError):
    """Bad input to midl-convert (unknown model, offline, bad setting, no match, ...).

    The CLI prints the message as one line and exits with code 2.
    """
