"""The static decode state (student/inference/decode.py): fixed buffers whose storage never changes, the ring-buffer
window equal to an independent concatenating step (tests/decode_oracle.py) for prefixes shorter than, equal to and longer than the window (and
the sinks), and generation through the static path giving the full forward's logits at every step for every recipe,
with the recurrent step proven to run (the prefix is never re-run)."""

from __future__ import annotations

import pytest
import torch

import decode_oracle
from tcache.student.inference import prefill
from tcache.student.inference.decode import StaticDecoder

V = 97
W, S = 6, 2  # the hybrid's window and sinks: small, so prefixes cross both


def student(recipe: str):
    """A tiny random student of each recipe, float32, eval mode (its kernels as tcache eval picks them on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tcache.student.models.hybrid import HybridConfig, HybridStudent
    from tcache.student.models.xlstm import Student, StudentConfig

    torch.manual_seed(0)
    if recipe == "hybrid":
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
        lm.config._attn_implementation = "sdpa"
        model = HybridStudent(lm, HybridConfig(window=W, sinks=S))
        with torch.no_grad():  # gates away from their init, so both branches and the output gate matter
            for mx in model.mixers:
                mx.ogate_w.normal_(0, 0.3), mx.phi_q.add_(torch.randn_like(mx.phi_q) * 0.1)
        model.set_kernel(torch.device("cpu"))
    else:
        cfg = StudentConfig(vocab_size=V, hidden_size=32, num_blocks=2, num_heads=4, context_length=64,
                            slstm_at=[0] if recipe == "v1" else [], slstm_backend="vanilla", recipe=recipe)
        model = Student(cfg)
    return model.eval()


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# the hybrid's prefixes: inside the sinks, shorter than, equal to and longer than the window (+ sinks); the xLSTM
# state has no window, so one length is enough
PREFIXES = [("hybrid", T) for T in (1, S, W - 1, W, W + S + 3)] + [("v1", 9), ("v2", 9)]


@pytest.mark.parametrize("recipe, T", PREFIXES)
def test_static_steps_equal_the_concatenating_path_and_keep_their_storage(recipe, T):
    """Eight steps from a T-token prefix: logits equal decode.step's (float32, 1e-5), and every buffer of the state
    keeps its data_ptr across steps (updated in place, never rebound)."""
    model = student(recipe)
    prompt = ids(2, T)
    with torch.no_grad():
        _, ref = prefill.prefill(model, prompt)
        _, state = prefill.prefill(model, prompt)
    static = StaticDecoder(model, state, capture=False)
    ptrs = [t.data_ptr() for t in static._tensors()]
    nxt = ids(2, 8, seed=2)
    for t in range(8):
        want = decode_oracle.step(model, nxt[:, t:t + 1], ref)  # (2, 1, V)
        got = static.step(nxt[:, t:t + 1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert [x.data_ptr() for x in static._tensors()] == ptrs
    assert int(static.pos) == T + 8


def test_the_ring_buffer_holds_the_last_window_at_its_slots():
    """After prefill and steps, slot t % W holds position t's key for the last W positions (the concatenating
    path's window, reordered), and the sinks hold positions 0..S-1."""
    model = student("hybrid")
    with torch.no_grad():
        _, ref = prefill.prefill(model, ids(1, 3))
        _, state = prefill.prefill(model, ids(1, 3))
    static = StaticDecoder(model, state, capture=False)
    nxt = ids(1, 9, seed=3)
    for t in range(9):
        decode_oracle.step(model, nxt[:, t:t + 1], ref)
        static.step(nxt[:, t:t + 1])
    P = 3 + 9  # positions 0..11 seen
    for buf, st in zip(static.layers, ref.layers):
        order = [t % W for t in range(P - W, P)]
        torch.testing.assert_close(buf.win_k[:, :, order], st.win_k)
        torch.testing.assert_close(buf.sink_k, st.sink_k)


def full_logits(hf, seq: torch.Tensor) -> torch.Tensor:
    """The exported student's parallel forward over the whole of seq (B, T): logits (B, T, V), each position's from its
    prefix alone (causal), so position t's are what a decode step after token t must give."""
    with torch.no_grad():
        return hf.student.head(hf.student.features(seq)[0])


def generated(hf, prompt: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """generate()'s greedy tokens (B, T + new) and the raw logits of each generated step (B, new, V)."""
    out = hf.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
                      output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


# The hybrid from a one-token prompt: its steps write the second sink, fill the ring buffer (slots not yet written
# masked), see each sink leave the window and the ring wrap; from a long prompt every step is past all of that.
@pytest.mark.parametrize("recipe, T", [("v1", W + S + 4), ("v2", W + S + 4), ("hybrid", 1), ("hybrid", W + S + 4)])
def test_generate_through_the_static_path_gives_the_full_forwards_logits(recipe, T, monkeypatch):
    """generate() of the exported class (the static path, the one decode path on every device): the logits of every
    generated step are the full forward's over the whole prefix (float32, 1e-4), its tokens their argmax; the static
    step ran once per new token after the first, and the parallel forward only once (the prefix is never re-run).
    Tokens alone are not enough: on a tiny random model greedy tokens survived an off-by-one ring slot, a mask that
    let one unwritten slot in, and a sink scored while still in the window."""
    from tcache.student.inference.hf import to_hf

    hf = to_hf(student(recipe), {"config": {"recipe": recipe}}).eval()
    calls = {"step": 0, "parallel": 0}
    step = StaticDecoder._step
    # the parallel forward over a whole prefix: the xLSTM's features(), the hybrid's converted teacher
    owner = hf.student.lm.model if recipe == "hybrid" else hf.student
    name = "forward" if recipe == "hybrid" else "features"
    parallel = getattr(owner, name)

    def counted_step(*a, **k):
        calls["step"] += 1
        return step(*a, **k)

    def counted_parallel(*a, **k):
        calls["parallel"] += 1
        return parallel(*a, **k)

    monkeypatch.setattr(StaticDecoder, "_step", counted_step)
    monkeypatch.setattr(owner, name, counted_parallel)
    prompt, new = ids(2, T), 12
    got, steps = generated(hf, prompt, new)
    assert calls == {"step": new - 1, "parallel": 1}, calls  # one prefill, then one static step per token
    monkeypatch.setattr(owner, name, parallel)
    full = full_logits(hf, got)  # (2, T + new, V)
    torch.testing.assert_close(steps, full[:, T - 1:-1], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[:, :T], prompt) and torch.equal(got[:, T:], full[:, T - 1:-1].argmax(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run in the GPU call)")
@pytest.mark.parametrize("recipe", ["v1", "v2", "hybrid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_step_replays_the_eager_static_step_on_cuda(recipe, dtype):
    """The CUDA graph's replay gives the eager static step's logits (fp32: 1e-4; bf16: the dtype's tolerance), its
    buffers keep their storage, and it is captured once for all steps; greedy generate() equals full-forward greedy."""
    from tcache.student.inference.hf import to_hf

    model = student(recipe).cuda().to(dtype)
    prompt = ids(2, W + S + 3).cuda()
    with torch.no_grad():
        _, a = prefill.prefill(model, prompt)
        _, b = prefill.prefill(model, prompt)
    eager, graph = StaticDecoder(model, a, capture=False), StaticDecoder(model, b, capture=True)
    nxt = ids(2, 6, seed=2).cuda()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for t in range(6):
        want = eager.step(nxt[:, t:t + 1])
        got = graph.step(nxt[:, t:t + 1])
        ptrs = [x.data_ptr() for x in graph._tensors()]
        torch.testing.assert_close(got.float(), want.float(), **tol)
    assert graph.captures == 1 and [x.data_ptr() for x in graph._tensors()] == ptrs
    hf = to_hf(student(recipe), {"config": {"recipe": recipe}}).cuda().eval()
    got = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            x, _ = hf.student.features(seq)
            seq = torch.cat([seq, hf.student.head(x[:, -1:]).argmax(-1)], 1)
    assert torch.equal(got, seq) and hf.static_decode_captures == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xlstm's CUDA sLSTM cell needs a GPU (run in the GPU call)")
def test_v1_prefill_on_cuda_slstm_twins_continues_as_the_vanilla_cells(monkeypatch):
    """v1's bf16 prefill on xlstm's CUDA sLSTM cells (student/inference/slstm_cuda.py) is as close to a float32 vanilla
    reference as the bf16 vanilla cells' own prefill: its logits, and the logits of three decode steps from the state
    it leaves (the state the static decode continues from); the vanilla cells are back in place after it."""
    import copy

    from tcache.student.inference import slstm_cuda
    from tcache.student.models.xlstm import Student, StudentConfig

    torch.manual_seed(0)
    cfg = StudentConfig(vocab_size=V, hidden_size=128, num_blocks=2, num_heads=4, context_length=64, slstm_at=[0],
                        slstm_backend="vanilla", recipe="v1")
    ref = Student(cfg).eval().cuda()  # float32 vanilla cells: the reference (fp32 never takes the twins)
    with torch.no_grad():  # the recurrent kernel starts at zeros: random, so its layout conversion is exercised
        ref.blocks.blocks[0].xlstm.slstm_cell._recurrent_kernel_.normal_(0, 0.2)
    model = copy.deepcopy(ref).to(torch.bfloat16)
    prompt, nxt = ids(2, 40).cuda(), ids(2, 3, seed=2).cuda()

    def run(m):
        logits, state = prefill.prefill(m, prompt)
        steps = [decode_oracle.step(m, nxt[:, t:t + 1], state) for t in range(3)]
        return torch.cat([logits[:, -1:]] + steps, 1).float()  # (B, 4, V)

    with torch.no_grad():
        want = run(ref)
        assert slstm_cuda.usable(model, prompt.device, torch.bfloat16)
        twin = run(model)
        monkeypatch.setenv(slstm_cuda.ENV, "vanilla")
        assert not slstm_cuda.usable(model, prompt.device, torch.bfloat16)
        vanilla = run(model)
    cell = model.blocks.blocks[0].xlstm.slstm_cell
    assert type(cell).__name__ == "sLSTMCell_vanilla" and slstm_cuda.TWIN in cell.__dict__
    err_twin, err_vanilla = (twin - want).abs().max().item(), (vanilla - want).abs().max().item()
    assert err_twin <= 2 * err_vanilla + 1e-2, (err_twin, err_vanilla)


def test_the_cuda_twin_gets_the_kernels_input_layout_and_the_vanilla_cells_weights():
    """The twin of a vanilla sLSTM cell (built here without its CUDA extension, so on any device) takes its input in
    the layout xlstm's CUDA cell declares for its kernel (gates within heads), and that input is the vanilla cell's own
    input re-laid out, not reordered; its recurrent kernel and bias are the vanilla cell's in xlstm's external layout.
    (The vanilla cell rewrites its config's layout; a twin copying that config fed the kernel its gates out of order:
    the GPU test above caught it at 1.5 logits from the reference.)"""
    from xlstm.blocks.slstm.cell import sLSTMCell_cuda, sLSTMCell_vanilla, sLSTMCellConfig

    from tcache.student.inference import slstm_cuda

    torch.manual_seed(0)
    cell = sLSTMCell_vanilla(sLSTMCellConfig(hidden_size=32, num_heads=4, backend="vanilla"))
    with torch.no_grad():
        cell._recurrent_kernel_.normal_(), cell._bias_.normal_()
    twin = sLSTMCell_cuda(slstm_cuda.twin_config(cell.config, torch.bfloat16), skip_backend_init=True)
    slstm_cuda.load_weights(twin, cell.to(torch.bfloat16))
    assert twin.config.internal_input_shape == twin.internal_input_shape  # what xlstm's CUDA cell sets for its kernel
    G, N, S, B = 4, 4, 5, 2
    x = torch.randn(B, S, G * 32)  # the block's input: (B, S, gates x heads x head dim)
    vanilla_in = cell._permute_input(x).view(S, B, G, N, -1)  # (S, B, G, N, Dh)
    assert torch.equal(twin._permute_input(x), vanilla_in.permute(0, 1, 3, 2, 4).reshape(S, B, -1))
    assert torch.equal(twin._recurrent_kernel_int2ext(twin._recurrent_kernel_),
                       cell._recurrent_kernel_int2ext(cell._recurrent_kernel_))
    assert torch.equal(twin._bias_int2ext(twin._bias_), cell._bias_int2ext(cell._bias_))


@pytest.mark.parametrize("recipe", ["v1", "v2", "hybrid"])
def test_a_prefill_split_into_rows_equals_the_whole_batch(recipe, monkeypatch):
    """A batch too large for one kernel grid is prefilled a few rows at a time (prefill._rows_per_call): the logits
    and every tensor of the stacked state equal the whole batch's."""
    model = student(recipe)
    prompt = ids(5, W + S + 3)
    with torch.no_grad():
        want_logits, want = prefill.prefill(model, prompt)
        monkeypatch.setattr(prefill, "_rows_per_call", lambda m, x: 2)
        got_logits, got = prefill.prefill(model, prompt)
    torch.testing.assert_close(got_logits, want_logits)
    flat = StaticDecoder(model, want, capture=False)._tensors(), StaticDecoder(model, got, capture=False)._tensors()
    assert len(flat[0]) == len(flat[1]) > 1
    for a, b in zip(*flat):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("first", [True, False])
def test_the_branch_free_slstm_pointwise_equals_xlstms(first):
    """slstm_step._slstm_pointwise (no host branch, so a CUDA graph can hold it) gives xlstm's vanilla pointwise
    step exactly, at the first step (n all zero: xlstm's other branch) and after it (float64)."""
    from xlstm.blocks.slstm.src.vanilla.slstm import slstm_forward_pointwise

    from tcache.student.inference.slstm_step import _slstm_pointwise

    g = torch.Generator().manual_seed(int(first))
    B, H = 3, 8
    wx, ry, b = (torch.randn(B, 4 * H, generator=g, dtype=torch.float64) for _ in range(3))
    states = torch.randn(4, B, H, generator=g, dtype=torch.float64)
    states[2] = 0.0 if first else states[2].abs() + 0.1  # n
    for got, want in zip(_slstm_pointwise(wx, ry, b, states, {}), slstm_forward_pointwise(wx, ry, b, states, {})):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
