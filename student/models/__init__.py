"""What a student is: `xlstm.py` (Distil-xLSTM v1 / v2: xlstm blocks between the teacher's frozen embedding and
head), `hybrid.py` (the teacher with attention replaced by mixers), `mixer.py` (one mixer: features, gates, branches,
their mix), `window.py` (window + sinks attention), `joint.py` (LoLCATs' joint normalisation), `match_loss.py` (what a
mixer compares with the teacher's attention in stage I), `lora.py` (adapters), `io.py` (a saved student directory).

May import: the tcache base and the cache's format (teachercache schema / manifest / codecs / reader). Never
training/ or inference/: a model does not know how it is trained or run. Generation states plug in from outside: a
mixer whose `cache` is set hands its forward to that state object (`cache.forward(mixer, x, position_embeddings)`).
"""
