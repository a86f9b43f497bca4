"""The one exception type for failures a user causes (bad path, bad image, bad flag).

Scripts catch it at the top level and print its message as a single line on stderr, then exit
non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    pass
