"""mkdocs hook: the site shows the installed `melbo_lens.__version__` in its title."""

from __future__ import annotations

from typing import Any


def on_config(config: Any) -> Any:
    from melbo_lens import __version__

    config["site_name"] = f"melbo_lens {__version__}"
    return config
