"""Does xlstm's sLSTM CUDA cell build on this GPU machine (it compiles with nvcc at construction), does it match the
vanilla cell (the same weights, bf16, against an fp32 vanilla reference), and how fast is its prefill? One sLSTM layer
at v1's seeds' shape (D 960, 16 heads). On the GPU:

    python benchmarks/slstm_probe.py [FLAG]    # FLAG: wait for this file before using the GPU (run beside a benchmark)
"""
import copy, os, sys, time
import torch
from xlstm.blocks.slstm.layer import sLSTMLayer, sLSTMLayerConfig

flag = sys.argv[1] if len(sys.argv) > 1 else None
t0 = time.time()
cfg = dict(embedding_dim=960, num_heads=16, conv1d_kernel_size=4, bias_init="powerlaw_blockdependent")
torch.manual_seed(0)
va = sLSTMLayer(sLSTMLayerConfig(backend="vanilla", **cfg))
try:
    cu = sLSTMLayer(sLSTMLayerConfig(backend="cuda", **cfg))
except Exception as e:
    print("BUILD FAILED", type(e).__name__, str(e)[-3000:], flush=True)
    raise SystemExit(1)
print(f"cuda cell built in {time.time() - t0:.0f} s", flush=True)
with torch.no_grad():
    for name, p in cu.named_parameters():
        if "slstm_cell" not in name:
            p.copy_(dict(va.named_parameters())[name])
    vc, cc = va.slstm_cell, cu.slstm_cell
    cc._recurrent_kernel_.copy_(cc._recurrent_kernel_ext2int(vc._recurrent_kernel_int2ext(vc._recurrent_kernel_)))
    cc._bias_.copy_(cc._bias_ext2int(vc._bias_int2ext(vc._bias_)))
while flag and not os.path.exists(flag):
    time.sleep(2)
dev = torch.device("cuda")
va, cu = va.to(dev, torch.bfloat16).eval(), cu.to(dev, torch.bfloat16).eval()
x = torch.randn(2, 128, 960, device=dev, dtype=torch.bfloat16)
with torch.no_grad():
    ya, sa = va(x, return_last_state=True)
    yc, sc = cu(x, return_last_state=True)
    va32 = copy.deepcopy(va).float()
    y64, _ = va32(x.float(), return_last_state=True)
print("max |cuda - vanilla|", (ya.float() - yc.float()).abs().max().item(), " |vanilla bf16 - fp32|",
      (ya.float() - y64).abs().max().item(), " |cuda - fp32|", (yc.float() - y64).abs().max().item(),
      " state", (sa["slstm_state"].float() - sc["slstm_state"].float()).abs().max().item(), flush=True)
for B, S in ((1, 2048), (1, 8192), (8, 8192), (64, 2048)):
    x = torch.randn(B, S, 960, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        for layer, name in ((cu, "cuda"), (va, "vanilla")):
            if name == "vanilla" and S > 2048:
                continue
            layer(x[:, :64]); torch.cuda.synchronize(); t = time.time()
            layer(x, return_last_state=True); torch.cuda.synchronize()
            print(f"{name} B {B} S {S}: {B * S / (time.time() - t):,.0f} tokens/s per layer", flush=True)
