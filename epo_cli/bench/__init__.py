"""Benchmarks into docs/benchmarks.md (``python -m epo_cli.bench``, ``nox -s bench``).

One module per measured part (``--only PART``): ``envs``, ``update``, ``compile``,
``rollout``, ``scaling``, ``packed``. ``common`` holds what several parts use, ``document`` the page's
header and its ``<!-- bench:PART -->`` blocks, ``cli`` the arguments and ``main``.
"""

from epo_cli.bench.document import merge_part, render_header

__all__ = ["merge_part", "render_header"]
