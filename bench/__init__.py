"""llmrelay's benchmark: figures for the broker's claims, measured, never asserted.

``llmrelay bench --preset NAME [--json]`` runs one named scenario
(``bench.presets``): the orchestrator (``_orchestrate``) starts nats-server,
fake providers, worker processes and load generators (``_loadgen``) as child
processes (``_cluster``), measures each one's CPU and peak RSS from /proc
(``_procstat``), and renders the figures (``_report``) as text or JSON.
The failover scenario lives in ``_failover``; ``_profile`` summarises the
py-spy profiles of ``--profile DIR``. bench/RESULTS.md holds a run of every
preset, with the commands; bench/results/ its JSON reports.
"""

from bench._orchestrate import run_preset
from bench._report import BenchReport, render_text
from bench.presets import PRESETS, Overrides, Preset, apply_overrides

__all__ = [
    "PRESETS",
    "BenchReport",
    "Overrides",
    "Preset",
    "apply_overrides",
    "render_text",
    "run_preset",
]
