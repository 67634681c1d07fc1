"""Named benchmark scenarios. ``llmrelay bench --list`` prints them.

A preset fixes everything a run depends on: the fake provider's timing, the
pool (workers, slots, rate limit), the queue bound, and one or more phases of
load. Command-line options override single fields (``apply_overrides``), so
``--preset steady --rate 1000 --duration 5`` is one rate of that scenario, shorter.

Scenarios:

- ``load``: each phase runs twice, first straight at the fake provider
  (``direct``), then through the broker; the difference is the broker's overhead.
- ``spike``: one burst of jobs into the bounded queue, drained at the pool's
  rate limit; queue depth and memory are sampled throughout.
- ``failover``: a primary pool whose provider answers 503 at once, then one whose
  stream is cut mid-answer (the backup continues it), then SIGKILL of the
  primary worker while jobs flow; see ``_failover``.
- ``gateway``: like ``load``, with the broker side sent as streamed HTTP to an
  ``llmrelay gateway`` process (``_orchestrate.load_scenario``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

Mode = Literal["open", "closed", "burst"]
Scenario = Literal["load", "spike", "failover", "gateway"]


class ProviderSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The fake provider: answer length and timing (``llmrelay mock-provider``)."""

    tokens: int = 8
    ttft_ms: float = 0.0
    token_delay_ms: float = 0.0


class Phase(msgspec.Struct, frozen=True, kw_only=True):
    """One load shape (see ``bench._loadgen``)."""

    name: str
    mode: Mode
    rate: float = 0.0  # open: requests/s, all generator processes together
    concurrency: int = 1  # closed: clients; burst: publishes in flight
    requests: int = 0  # burst: jobs in the spike
    duration_s: float = 10.0
    warmup_s: float = 1.0


class Preset(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    scenario: Scenario = "load"
    phases: tuple[Phase, ...] = ()
    provider: ProviderSpec = ProviderSpec()
    workers: int = 1  # worker processes of the pool
    slots: int = 256  # concurrency of each worker (= its HTTP connections)
    rpm: int = 0  # the pool's requests/min limit (0 = none)
    queue_capacity: int = 10_000
    loadgen_procs: int = 1
    direct_loadgen_procs: int = 0  # 0: as many as loadgen_procs
    direct: bool = True
    memory_per_stream: bool = False
    drain_s: float = 30.0  # after the last send, how long answers may take
    deadline_s: float = 120.0
    # failover only
    requests: int = 0  # baseline, 503 -> backup and cut -> backup samples, one at a time
    trials: int = 0  # SIGKILLs of the primary worker
    kill_rate: float = 200.0  # arrival rate while the primary is killed
    # the cut run and its baseline: delay between tokens, so the cut lands mid-answer
    cut_token_delay_ms: float = 2.0


_STEADY_PROVIDER = ProviderSpec(tokens=8, ttft_ms=5.0, token_delay_ms=1.0)
_ZERO_PROVIDER = ProviderSpec(tokens=8)
STEADY_RATES = (100, 500, 1000, 2000)
GATEWAY_RATES = (250, 500, 1000, 1500)


def _steady(rate: int, duration_s: float = 20.0) -> Phase:
    return Phase(name=f"steady@{rate}", mode="open", rate=rate, duration_s=duration_s, warmup_s=2)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="a few seconds of open-loop load at 50 req/s, direct then broker",
        phases=(Phase(name="smoke@50", mode="open", rate=50, duration_s=3, warmup_s=0.5),),
        provider=_STEADY_PROVIDER,
        slots=16,
        drain_s=10,
    ),
    "steady": Preset(
        name="steady",
        description=(
            "open loop at 100, 500, 1,000 and 2,000 req/s, 20 s each, 8-chunk answers "
            "(provider: first token after 5 ms, then 1 ms per token), two workers with 16 "
            "slots each; direct, then broker, at each rate (--rate R: one rate only)"
        ),
        phases=tuple(_steady(rate) for rate in STEADY_RATES),
        provider=_STEADY_PROVIDER,
        workers=2,
        slots=16,
        loadgen_procs=2,
        drain_s=20,
    ),
    "ceiling": Preset(
        name="ceiling",
        description=(
            "closed loop, 128 clients, zero-latency provider (8 chunks at once), two workers "
            "with 8 slots each: the most streamed requests/s the machine sustains; "
            "direct (two generator processes), then broker (one)"
        ),
        phases=(Phase(name="ceiling", mode="closed", concurrency=128, duration_s=15, warmup_s=3),),
        provider=_ZERO_PROVIDER,
        workers=2,
        slots=8,
        loadgen_procs=1,
        direct_loadgen_procs=2,
    ),
    "gateway-ceiling": Preset(
        name="gateway-ceiling",
        description=(
            "open loop through the HTTP gateway at 250, 500, 1,000 and 1,500 req/s, 10 s each "
            "(streamed chat completions, zero-latency provider, 8 chunks), two workers with 16 "
            "slots each; the same load straight to the fake provider first, at each rate "
            "(--rate R: one rate only)"
        ),
        scenario="gateway",
        phases=tuple(
            Phase(name=f"gateway@{rate}", mode="open", rate=rate, duration_s=10, warmup_s=2)
            for rate in GATEWAY_RATES
        ),
        provider=_ZERO_PROVIDER,
        workers=2,
        slots=16,
        loadgen_procs=1,
        drain_s=20,
        deadline_s=30,
    ),
    "spike": Preset(
        name="spike",
        description=(
            "50,000 jobs submitted at once into a queue bounded at 60,000, drained by two "
            "workers at the pool's limit of 400 req/s (rpm 24,000); nothing lost, memory and "
            "queue depth sampled"
        ),
        scenario="spike",
        phases=(Phase(name="spike", mode="burst", requests=50_000, concurrency=512),),
        provider=_ZERO_PROVIDER,
        rpm=24_000,
        workers=2,
        slots=8,
        queue_capacity=60_000,
        direct=False,
        loadgen_procs=2,
        deadline_s=900,
        drain_s=600,
    ),
    "failover": Preset(
        name="failover",
        description=(
            "route primary -> backup, 8-token answers. (1) primary's provider answers 503 at "
            "once (one immediate retry, then the backup): time from the 503 to the backup's "
            "first chunk; (2) tokens 2 ms apart, the primary's stream cut after 4 of them, the "
            "backup continues it: the caller's extra wait and longest stall; 300 requests one "
            "at a time each, against a healthy baseline of the same timing; (3) SIGKILL of the "
            "primary worker at 200 req/s, 20 times: time to the next job served by the backup"
        ),
        scenario="failover",
        provider=_ZERO_PROVIDER,
        slots=16,
        direct=False,
        requests=300,
        trials=20,
        kill_rate=200.0,
    ),
    "long-streams": Preset(
        name="long-streams",
        description=(
            "1,000 long streams submitted at once to one worker with 1,024 slots (200 tokens, "
            "100 ms apart: ~20 s each): worker memory per concurrent stream; direct, then broker"
        ),
        phases=(Phase(name="streams@1000", mode="burst", requests=1000, concurrency=1000),),
        provider=ProviderSpec(tokens=200, ttft_ms=50.0, token_delay_ms=100.0),
        slots=1024,
        memory_per_stream=True,
        deadline_s=600,
        drain_s=300,
    ),
}


class Overrides(msgspec.Struct, kw_only=True):
    """Command-line changes to a preset; None leaves the preset's value."""

    rate: float | None = None
    duration_s: float | None = None
    requests: int | None = None
    concurrency: int | None = None
    workers: int | None = None
    slots: int | None = None
    loadgen_procs: int | None = None
    tokens: int | None = None
    provider_ttft_ms: float | None = None
    provider_token_delay_ms: float | None = None
    mode: Mode | None = None
    trials: int | None = None
    warmup_s: float | None = None
    direct: bool | None = None


def apply_overrides(preset: Preset, o: Overrides) -> Preset:
    """The preset with the given fields changed (phases included)."""
    phases = tuple(_phase_overrides(p, o) for p in preset.phases)
    if o.rate is not None and preset.scenario in ("load", "gateway"):
        base = phases[0] if phases else _steady(int(o.rate))
        phases = (msgspec.structs.replace(base, name=f"open@{o.rate:g}", mode="open"),)
    changes: dict[str, object] = {"phases": phases}
    for field in ("workers", "slots", "loadgen_procs", "trials", "direct"):
        value = getattr(o, field)
        if value is not None:
            changes[field] = value
    if o.requests is not None:
        changes["requests"] = o.requests
    if o.rate is not None and preset.scenario == "failover":
        changes["kill_rate"] = o.rate
    provider = {
        key: value
        for key, value in (
            ("tokens", o.tokens),
            ("ttft_ms", o.provider_ttft_ms),
            ("token_delay_ms", o.provider_token_delay_ms),
        )
        if value is not None
    }
    if provider:
        changes["provider"] = msgspec.structs.replace(preset.provider, **provider)
    return msgspec.structs.replace(preset, **changes)


def _phase_overrides(phase: Phase, o: Overrides) -> Phase:
    changes: dict[str, object] = {}
    if o.mode is not None:
        changes["mode"] = o.mode
    if o.rate is not None and phase.mode == "open":
        changes["rate"] = o.rate
    if o.duration_s is not None:
        changes["duration_s"] = o.duration_s
    if o.warmup_s is not None:
        changes["warmup_s"] = o.warmup_s
    if o.concurrency is not None:
        changes["concurrency"] = o.concurrency
    if o.requests is not None and phase.mode == "burst":
        changes["requests"] = o.requests
    return msgspec.structs.replace(phase, **changes) if changes else phase
