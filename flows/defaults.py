"""The sampler settings the CLI and the flows use unless told otherwise (no heavy imports: the CLI reads
them at start-up).

Chosen from ``benchmarks/solver_quality.py`` (table in benchmarks/RESULTS.md, "Solver steps at equal
quality"): the cheapest setting whose quality on held-out cells is within the 95% CI of the release's
50-step sampler on every target (paired PSNR/SSIM vs the real cell, KID and pixel W1 vs the real set).
That measurement is of the bundled model; the release's own setting stays one flag away:
``--solver release --steps 50``.
"""

from __future__ import annotations

DEFAULT_SOLVER = "2m"
DEFAULT_STEPS = 10
RELEASE_SOLVER, RELEASE_STEPS = "release", 50
