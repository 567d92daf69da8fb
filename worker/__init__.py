"""space-worker: the streaming runtime (Kafka in, batched SPACE inference, verdicts out) and the CLI.

Dependencies point one way: ``worker -> models, schemas``. Pure logic (batcher, offset tracker,
threshold cache) lives in small modules that take injected clocks and need no broker.
"""

__version__ = "0.1.0"
