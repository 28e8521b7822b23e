"""A Griffe extension for the API reference: jaxlora's docstrings head their doctests ``Example:``.

Griffe's Google-style parser takes only ``Examples:`` as an examples section (whose ``>>>`` lines it
renders as code); ``Example:`` would become an admonition whose doctest lines render as prose. This
renames the heading when the docs are built; the docstrings themselves are left as they are.
"""

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
