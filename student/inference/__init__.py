"""How a trained student runs: `prefill.py` (a prompt through the parallel kernels once, keeping each layer's
state), `decode.py` (the static state: fixed buffers updated in place, and its step, captured in a CUDA graph on
CUDA; the one decode path on every device), `mixer_step.py` (a hybrid mixer's one-token step on those buffers),
`joint_state.py` (the joint mix's recurrent state), `chunked_prefill.py` (long xLSTM prompts in chunks),
`slstm_cuda.py` and `slstm_step.py` (sLSTM cells for prefill and a capturable step), `hf.py` (the transformers model
and `tcache export`), `generate.py`, `eval.py` (perplexity).

May import: models/, the tcache base, the cache's format. Never training/.
"""
