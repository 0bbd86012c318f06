"""The one exception type the CLI turns into a plain message and exit status 2.

A message names what the user set. From Python that is a parameter (``n``), on the command line a flag (``--n``):
the library writes ``{n}`` in the message and names the parameter in ``params``; ``str(err)`` gives the Python
wording and the CLI calls ``err.render(flag_for)`` for its own.
"""

from __future__ import annotations

from collections.abc import Callable


def flag_name(param: str) -> str:
    """The command-line spelling of a parameter: ``ppl_samples`` -> ``--ppl-samples``."""
    return "--" + param.replace("_", "-")


class LlmdropError(Exception):
    """A problem with the user's input or environment, worded as what is wrong and what to do.

    ``LlmdropError("nothing to drop: {n} must be at least 1 (got 0)", params=["n"])`` reads
    "nothing to drop: n must be at least 1 (got 0)" in Python and "... --n must be ..." from the CLI.
    """

    def __init__(self, message: str, params: list[str] | tuple[str, ...] = ()):
        self.template = message
        self.params = tuple(params)
        super().__init__(self.render(str))

    def render(self, name: Callable[[str], str] = flag_name) -> str:
        if not self.params:
            return self.template
        return self.template.format(**{p: name(p) for p in self.params})
