"""MkDocs hook: API pages are titled by the name they document.

A page under docs/api/ holds one line, `::: keras_stateful.layers.CenterLoss`;
without a title MkDocs would derive one from the file name ("Calibrate" for
calibrate.md). This names the page `CenterLoss`, `calibrate`, as in the code,
and the folder's section "API reference" instead of "Api".
"""

import re

API_OBJECT = re.compile(r"^:::\s*([\w.]+)", re.M)


def on_page_markdown(markdown, page, **kwargs):
    found = API_OBJECT.search(markdown)
    if page.file.src_uri.startswith("api/") and found and "title" not in page.meta:
        page.meta["title"] = found.group(1).rsplit(".", 1)[-1]
    return markdown


def on_nav(nav, **kwargs):
    for item in nav.items:
        if item.is_section and item.title == "Api":
            item.title = "API reference"
    return nav
