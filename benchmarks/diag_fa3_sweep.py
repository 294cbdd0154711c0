import sys, torch
sys.path.insert(0, "plugins/cuda_fa3/tests")
import conformance_grid as cg
from attn_dispatch import AttentionParams
from attn_dispatch_cuda_fa3 import resolve_provider
from attn_dispatch_flash import FlashArgs
from vllm.vllm_flash_attn import flash_attn_varlen_func
import torch.nn.functional as F
p = resolve_provider("sm90")
def one(lq, lk, h, hk, d, window, causal, dtype=torch.bfloat16, splits=0, pack=None):
    params = AttentionParams(causal=causal, window_size=window)
    case = cg.Case("s", (lq,), (lk,), h, hk, d, 16, -(-lk // 16) + 1, dtype, (params,), False, 3)
    b = cg.make_batch(case)
    exact = cg.reference(case, b, params, upcast=True)
    ref = cg.reference(case, b, params, upcast=False)
    k, v = b.packed["k"], b.packed["v"]
    args = FlashArgs(cu_seqlens_q=b.packed["cu_seqlens_q"], cu_seqlens_k=b.packed["cu_seqlens_k"], max_seqlen_q=lq, max_seqlen_k=lk,
                     softmax_scale=d**-0.5, causal=causal, window_size=window, num_splits=splits, pack_gqa=pack)
    o = p.bind(args)(b.q, k, v, torch.empty_like(b.q))
    w = flash_attn_varlen_func(b.q, k, v, lq, b.packed["cu_seqlens_q"], lk, cu_seqlens_k=b.packed["cu_seqlens_k"], softmax_scale=d**-0.5,
                               causal=causal, window_size=list(window), fa_version=3)
    mask = cg.visible(lq, lk, params, "cuda")
    sd = F.scaled_dot_product_attention(b.q.transpose(0, 1).float(), k.transpose(0, 1).float().repeat_interleave(h // hk, 0),
                                        v.transpose(0, 1).float().repeat_interleave(h // hk, 0), attn_mask=mask).transpose(0, 1)
    e = lambda t: (t.float() - exact).abs().max().item()
    print(f"q={lq} k={lk} h={h}/{hk} d={d} w={window} causal={causal} splits={splits} pack={pack}: ours {e(o):.3g} vllm-api {e(w):.3g} sdpa-fp32 {e(sd):.3g} ref {e(ref):.3g} equal={torch.equal(o, w)}", flush=True)
for win in (100, 150, 176, 200, 255, 300, 400, 500, 640):
    one(651, 651, 32, 8, 256, (win, 0), True)
for d in (64, 128, 192):
    one(651, 651, 32, 8, d, (300, 0), True)
for lq, lk in ((651, 651), (300, 300), (400, 400), (500, 500), (256, 256), (257, 257), (384, 384), (385, 385), (396, 632), (165, 1150)):
    one(lq, lk, 8, 8, 128, (255, 0), True)
one(651, 651, 32, 8, 256, (300, 0), True, splits=1, pack=False)
one(651, 651, 32, 8, 256, (300, 0), False)
one(651, 651, 32, 8, 256, (300, 300), False)
one(651, 651, 32, 8, 256, (300, 0), True, dtype=torch.float16)
one(651, 651, 1, 1, 256, (300, 0), True)
