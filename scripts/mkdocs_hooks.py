"""MkDocs hooks: put benchmarks/README.md's plot on the site; check the API pages are complete.

docs/benchmarks.md includes benchmarks/README.md (pymdownx.snippets), whose image path,
results/scaling.png, is relative to benchmarks/. Serving the repository's own file at that
path beside the page keeps one copy of the plot and lets --strict check the link."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ("results/scaling.png",)


def on_files(files: Files, config) -> Files:
    for plot in PLOTS:
        files.append(File.generated(config, plot, abs_src_path=str(ROOT / "benchmarks" / plot)))
    return files


# Each API page and the module whose __all__ it must document in full.
API_PAGES = {
    "api/jaxlora.md": "jaxlora",
    "api/jaxlora-nnx.md": "jaxlora.nnx",
    "api/torchlora.md": "torchlora",
}


def on_page_content(html: str, page, config, files) -> str:
    """Fails the build when an API page lacks a name of its module's ``__all__``.

    mkdocstrings skips some names silently (griffe drops a function that shares its name with
    its module), so a missing entry would otherwise go unnoticed."""
    module_name = API_PAGES.get(page.file.src_uri)
    if module_name is None:
        return html
    ids = set(re.findall(r'id="([^"]+)"', html))
    depth = module_name.count(".")

    def documented(name: str) -> bool:
        # module.name, or module.submodule.name for a function rendered from its own module.
        return f"{module_name}.{name}" in ids or any(
            i.startswith(module_name + ".") and i.endswith("." + name) and i.count(".") == depth + 2
            for i in ids
        )

    missing = sorted(n for n in importlib.import_module(module_name).__all__ if not documented(n))
    if missing:
        raise PluginError(
            f"{page.file.src_uri} does not document {', '.join(missing)} of {module_name}.__all__"
        )
    return html
