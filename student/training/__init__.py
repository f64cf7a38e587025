"""How a student trains from a cache (`tcache distill`): `config.py` (DistillConfig) and `recipes.py`, `budget.py`
(micro-batches and steps per stage), `data.py` (cached rows as batches), `families.py` (a recipe's model from the
config and the cache), `losses.py`, `schedules.py`, `runtime.py` (precision, compile, memory cap), `checkpoint.py`,
`metrics.py`, and `train.py`, the one loop.

May import: models/, the tcache base, the cache's format. Never inference/.
"""
