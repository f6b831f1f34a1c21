"""The calibration grid for a GPU context: the batch sizes, prompt lengths and contexts GPUs serve.

A GPU step costs about the same from B=1 to B=32 (the weights' read dominates), so the grid spaces batch sizes
geometrically up to 256, prompts and prefill chunks up to 8k tokens, and one sequence's context up to 32k.
The context is one unified KV stream (kv_unified) so that a single slot can hold 32k positions.
"""

from __future__ import annotations

from calib.grid import Scenario, _mixed_grid

# llama.cpp context of a GPU calibration: 256 slots over one 256k-cell stream (32 GiB of F16 KV for Llama-3-8B),
# 8k-token steps split into 512-token micro-batches (llama-server's defaults on a GPU)
GPU_CONTEXT = {"n_ctx": 262144, "n_seq_max": 256, "n_batch": 8192, "n_ubatch": 512, "kv_unified": True}


def gpu_grid(quick: bool = False, max_len: int = 32768) -> list[Scenario]:
    """Decodes at B = 1..256 and contexts up to 32k, prefills and chunks up to 8k, mixed steps, copies, idle."""
    top = max_len - 16  # a synthetic Llama-3 GGUF says n_ctx_train 8192: the longest prompt plus outputs
    sizes = (1, 4, 16, 64, 128, 256) if quick else (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
    out = [Scenario(f"decode B={b} L=128", "continuous", ((0, 128, 6, 0),) * b) for b in sizes]
    long = [(8, 2048), (32, 2048), (1, 8192), (4, 8192)] + ([] if quick else [(64, 1024), (16, 4096)])
    long = sorted({(b, min(n, top)) for b, n in long + [(1, 32000)]})
    out += [Scenario(f"decode B={b} L={n}", "continuous", ((0, n, 6, 0),) * b) for b, n in long]
    prompts = (128, 1024, 4096, 8192) if quick else (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144,
                                                      8192)
    out.append(Scenario("prefill sizes", "sequential", tuple((0, min(p, top), 2, 0) for p in prompts)))
    for cap in ((2048,) if quick else (512, 2048, 4096)):
        out.append(Scenario(f"chunked prefill {cap}", "chunked", ((0, min(8192, top), 2, 0),),
                            {"max_prefill_chunk_tokens": cap}))
    for b, p in ((16, 1024), (64, 2048), (128, 512)) if not quick else ((64, 1024),):
        out.append(Scenario(f"mixed B={b}+P={p}", "continuous", ((0, 128, 12, 0),) * b + ((3, p, 3, 0),)))
    out.append(Scenario("chunked mixed budget 2048", "chunked", ((0, 128, 16, 0),) * 64 + ((3, 6000, 3, 0),),
                        {"max_num_batched_tokens": 2048}))
    return out + _mixed_grid(quick)
