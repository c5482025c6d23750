"""MkDocs hook: Sphinx cross-reference roles in docstrings shown as plain code.

The docstrings write ``:func:`name``` and ``:class:`~package.Name``` (what ``help()`` and IDEs show); the
API pages render them as ``:func:<code>name</code>``. This drops the role, and for ``~`` keeps the last
part of the dotted name, as Sphinx does.
"""
from __future__ import annotations

import re

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):<code>(~)?([^<]*)</code>")


def plain_roles(html: str) -> str:
    return ROLE.sub(lambda m: f"<code>{m[2].split('.')[-1] if m[1] else m[2]}</code>", html)


def on_page_content(html, page, config, files):
    return plain_roles(html)
