"""NBCE in one room (Naive Bayes-based Context Extension, Su Jianlin 2023).

- `strategy.py`: the strategy (parameters, planning the rows) — what the registry loads;
- `chunking.py`: a long document into row-sized chunks;
- `protocol.py`: the typed tag each row carries to the engine, the combination's defaults, and
  `NbceCombiner`, which tags the rows (the service decodes them in lockstep:
  server/service/lockstep.py);
- `combine.py`: the arithmetic of one step, in plain PyTorch (the engine and the test reference
  both use it);
- `processor.py`: the vLLM logits processor that combines the rows in the engine (engine-core
  process; imports vLLM).

The plain transformers reference the tests compare against is tests/support/nbce_reference.py.
"""

from strategies.nbce.strategy import NbceParams, NbceStrategy

__all__ = ["NbceParams", "NbceStrategy"]
