"""What an attempt cost: a target's prices (``Price``) applied to its token counts.

Prices are per route target, in USD per million tokens (``routes.<name>.targets[i]
.price``). A target without one has an unknown cost, and then nothing says a cost
(``Done.cost_usd`` stays unset), never a zero. The worker prices the attempt that
answered from its ``Usage`` (``Done.cost_usd``) and every failed attempt from what
its ``Attempt`` records (``Attempt.cost_usd``), apart, so an answer is never billed
for the tokens a failed try burnt; ``llmrelay_cost_usd_total`` counts both.

The cost is summed in tokens times USD-per-million first and divided once, so known
usage at prices with short binary fractions (0.5, 2.5, 10) gives the exact cost.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
from msgspec import UNSET, UnsetType

from broker._protocol import Attempt, Usage

NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
_PER = 1_000_000


class Price(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A target's price in USD per million tokens.

    ``cached_input_per_mtok``: prompt tokens the provider read from its cache
    (``Usage.cached_tokens``); unset, they cost ``input_per_mtok``.
    """

    input_per_mtok: NonNegFloat
    output_per_mtok: NonNegFloat
    cached_input_per_mtok: NonNegFloat | None = None

    def __post_init__(self) -> None:
        prices = (self.input_per_mtok, self.output_per_mtok, self.cached_input_per_mtok or 0.0)
        if not all(math.isfinite(p) for p in prices):
            raise ValueError("a price must be a finite number of USD per million tokens")

    @property
    def per_mtok(self) -> float:
        """What ``order: price`` compares: input plus output per million tokens."""
        return self.input_per_mtok + self.output_per_mtok


def price_order(price: Price | None) -> float:
    """Sort key of ``order: price``: cheapest first, an unknown price last."""
    return price.per_mtok if price is not None else math.inf


def usage_cost(price: Price | None, usage: Usage) -> float | UnsetType:
    """USD of one answered attempt's ``usage``: cached prompt tokens at the cached
    price when the provider said how many and the target has one, the rest of the
    prompt at the input price, the completion at the output price."""
    if price is None:
        return UNSET
    cached = usage.cached_tokens if isinstance(usage.cached_tokens, int) else 0
    cached_price = price.cached_input_per_mtok
    if cached_price is None:
        cached, cached_price = 0, 0.0
    cached = min(max(0, cached), usage.prompt_tokens)
    micro = (
        (usage.prompt_tokens - cached) * price.input_per_mtok
        + cached * cached_price
        + usage.completion_tokens * price.output_per_mtok
    )
    return micro / _PER


def attempt_cost(price: Price | None, attempt: Attempt, prompt_tokens: int) -> float | UnsetType:
    """USD of a failed attempt, or unset when it is unknown or it used no tokens.

    A failed call reports no usage: an attempt that streamed nothing is taken to
    have cost nothing (the provider failed before answering); one that streamed
    ``completion_tokens`` is costed for them plus ``prompt_tokens`` (the worker's
    estimate of its prompt, which the provider read to answer), at the input price.
    """
    if price is None or attempt.completion_tokens <= 0:
        return UNSET
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=attempt.completion_tokens)
    return usage_cost(price, usage)
