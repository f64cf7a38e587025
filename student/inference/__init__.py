"""How a trained student runs: `prefill.py` (a prompt through the parallel kernels once, keeping each layer's
state), `decode.py` (the static state: fixed buffers updated in place, and its step, captured in a CUDA graph on
CUDA; the one decode path on every device), `fused_step.py` (the hybrid's step in a few kernels per layer, with
`fused_weights.py`, `window_step.py`, `mlstm_step.py`), `mixer_step.py` (the earlier step of a hybrid mixer on those
buffers), `joint_state.py` (the joint mix's recurrent state), `step_profile.py` (what one step launches),
`chunked_prefill.py` (long xLSTM prompts in chunks), `slstm_cuda.py` and `slstm_step.py` (sLSTM cells for prefill and a
capturable step), `hf.py` (the transformers model and `tcache export`), `generate.py`, `eval.py` (perplexity).

May import: models/, the tcache base, the cache's format. Never training/.
"""
