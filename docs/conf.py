"""Sphinx configuration for the pagedkv documentation."""

project = "pagedkv"
author = "the pagedkv developers"
copyright = "2026, the pagedkv developers"

extensions = ["myst_parser", "sphinx.ext.mathjax"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "conftest.py"]
html_theme = "furo"
html_title = "pagedkv"
suppress_warnings = ["myst.header"]
