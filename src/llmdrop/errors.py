"""The one exception type the CLI turns into a plain message and a non-zero exit."""


class LlmdropError(Exception):
    """A problem with the user's input or environment, worded as what is wrong and what to do."""
