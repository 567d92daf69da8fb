"""``space demo``: train, calibrate, serve and stream on the embedded stack, then report with pictures.

:func:`run_demo` (in :mod:`worker.demo.run`) runs the whole job; :mod:`worker.demo.live` keeps the
per-line counts and draws the live table; :mod:`worker.demo.report` writes ``index.html``,
``overview.png`` and ``metrics.json``.
"""

from worker.demo.run import DemoConfig, DemoError, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoError", "DemoResult", "run_demo"]
