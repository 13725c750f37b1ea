"""The command that gets the code, on the pages that say how (an MkDocs hook, see mkdocs.yml).

A page's `<!-- git clone -->` line becomes the real `git clone` of the repository the site was
built from (`repo_url`, which mkdocs.yml takes from `REPO_URL`; CI sets it from the repository it
runs in). A build without it, from a checkout, does not know where that checkout came from, so the
line becomes a sentence saying so instead of a made-up address. MkDocs loads this file by path,
so it imports only the standard library and MkDocs.
"""

from __future__ import annotations

import re

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

MARKER = re.compile(r"^( *)<!-- git clone -->$", re.M)
UNKNOWN = (
    "This copy of the site was built without `REPO_URL`, so it does not know the address of its "
    "repository: run the commands below in the checkout it was built from."
)


def clone_command(repo_url: str) -> str:
    """`git clone URL && cd NAME`, NAME being the directory git makes of URL."""
    url = repo_url.rstrip("/").removesuffix(".git")
    return f"git clone {url}.git && cd {url.rsplit('/', 1)[-1]}"


def replace_marker(markdown: str, repo_url: str | None) -> str:
    """The marker line as a bash block with the clone command, or the sentence when unknown."""

    def block(match: re.Match[str]) -> str:
        indent = match.group(1)
        if not repo_url:
            return indent + UNKNOWN
        lines = ["```bash", clone_command(repo_url), "```"]
        return "\n".join(indent + line for line in lines)

    return MARKER.sub(block, markdown)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """MkDocs hook: every page's marker, from the configured `repo_url`."""
    return replace_marker(markdown, config.repo_url)
