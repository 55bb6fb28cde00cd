"""mkdocs hooks: the site shows the installed `melbo_lens.__version__` in its title, and
carries one copy of plotly.js (from the installed plotly package) for the tutorials'
figures, so no page loads anything from outside the site."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def on_config(config: Any) -> Any:
    from melbo_lens import __version__

    config["site_name"] = f"melbo_lens {__version__}"
    return config


def on_post_build(config: Any) -> None:
    import plotly

    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    target = Path(config["site_dir"]) / "assets" / "plotly.min.js"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
