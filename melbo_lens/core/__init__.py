# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""The core: hook sites (the only builder of hook names), prompts, host capabilities,
the segment between two sites, and atomic I/O. It imports nothing else of melbo_lens."""
