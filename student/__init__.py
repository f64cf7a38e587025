"""Students: what a student is, how it trains from a cache, how it runs. Three rooms, one job each:

    models/     the student itself: xLSTM families, the hybrid and its mixer (window, joint mix, stage I match),
                LoRA adapters, a saved student directory. Imports the base and the cache's format only.
    training/   `tcache distill`: config, recipes, budget, data, losses, schedules, checkpoints, metrics, the loop.
                Imports models, never inference.
    inference/  running a trained student: prefill, the static decode state and its step, generate, export as a
                transformers model, eval. Imports models, never training.

No room imports the build side of teachercache: a student reads the cache's format (schema, manifest, codecs,
reader), nothing else. tests/test_layout.py holds these rules.

`hf.py` here is the stable import path of exported models (their modeling_tcache.py): it stays where it is.
"""
