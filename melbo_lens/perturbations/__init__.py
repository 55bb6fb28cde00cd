# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Perturbations: everything that changes a forward pass through hooks, member by member
(steering vectors, steering adapters, directional ablation and clamping, arithmetic).

`base.Perturbation` is the protocol every consumer takes; importing this package
registers every artifact format with `load_artifact`.
"""

from melbo_lens.perturbations import (  # noqa: F401  (format registry)
    adapters,  # pyright: ignore[reportUnusedImport]
    soft_prompts,  # pyright: ignore[reportUnusedImport]
    vectors,  # pyright: ignore[reportUnusedImport]
)
