"""llmrelay's worker side: a process that serves one pool of an LLM provider.

``Worker`` pulls a pool's jobs from JetStream within its slots and rate
budget, streams each answer back, and fails over, retries or dead-letters per
the route config. Everything else lives in private modules (see
``workers/_worker.py`` for how they fit) and may change.
"""

from workers._worker import Worker

__all__ = ["Worker"]
