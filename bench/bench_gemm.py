"""fp32 matrix-multiply peak of this machine, by library, beside kelly's training throughput, in one run.

Issue 16 asks training to reach 50% of the machine's fp32 peak, or for a profile that shows where the ceiling is.
The peak is not a constant of "the machine": it depends on the CPU the sandbox lands on (AVX-512 or AVX2 only),
on the library, and on the load. So this script measures it side by side with training, in one run:

- `torch` (MKL through `torch.mm`), `onednn` (`torch.ops.aten.mkldnn_linear` on a oneDNN weight), `numpy`
  (numpy's BLAS, OpenBLAS in the wheels) and `onnxruntime` (MLAS, a one-node MatMul graph): the best of
  `--repeats` runs of an M x K by K x N product, M = 4,096 (a training batch of 16 x 256 tokens) and the model's
  shapes (K, N) = (512, 1,536) (fused QKV), (512, 2,048) (MLP up), (2,048, 512) (MLP down), (512, 512) (output);
- `train`: tokens/s of the default training step (forward, cross-entropy, backward, AdamW; batch 16 x 256) on the
  issue's benchmark model (6 x 512, vocab 512) and its GFLOP/s by the 6N rule (6 x parameters x tokens/s).

It prints the CPU's vector extensions, the load, each library's GFLOP/s per shape, and training's share of the
best measured peak.

Usage: python bench/bench_gemm.py [--threads 2] [--repeats 7] [--train-steps 4]
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from kelly.core import intra_op_threads
from kelly.models import MusicTransformer, TransformerConfig

M = 16 * 256                                           # rows of a training batch's products (16 x 256 tokens)
SHAPES = [(512, 1536), (512, 2048), (2048, 512), (512, 512)]   # (K, N) of the model's weight products
BENCH_MODEL = dict(n_layers=6, width=512, n_heads=8, vocab_size=512)
BATCH, SEQ_LEN = 16, 256


def vector_extensions() -> str:
    "The AVX flags of this CPU, from /proc/cpuinfo (Linux)."
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
        return " ".join(sorted(f for f in flags if f.startswith(("avx", "fma", "amx"))))
    except (OSError, StopIteration): return "unknown"


def best_seconds(fn, repeats: int) -> float:
    "Best wall time of `repeats` calls, after one warm-up."
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t)
    return best


def gemm_runners(K: int, N: int, threads: int) -> dict:
    "One callable per library computing the same [M, K] x [K, N] product."
    a, b = torch.randn(M, K), torch.randn(K, N)
    an, bn = a.numpy(), b.numpy()
    w = b.t().contiguous().to_mkldnn()                    # oneDNN weight [N, K]
    runners = {"torch": lambda: torch.mm(a, b), "onednn": lambda: torch.ops.aten.mkldnn_linear(a.to_mkldnn(), w, None).to_dense(),
               "numpy": lambda: an @ bn}
    try:
        import onnx, onnxruntime
        from onnx import TensorProto, helper
        g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
                              [onnx.numpy_helper.from_array(bn, "b")])
        opts = onnxruntime.SessionOptions(); opts.intra_op_num_threads = threads
        sess = onnxruntime.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])
        runners["onnxruntime"] = lambda: sess.run(None, {"a": an})
    except ImportError: pass
    return runners


def train_tok_s(steps: int) -> tuple[float, int]:
    "Tokens/s (median step) of the plain training step on the benchmark model, and its parameter count."
    torch.manual_seed(0)
    model = MusicTransformer(TransformerConfig(**BENCH_MODEL, dropout=0.0)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ_LEN + 1))
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        if i: times.append(time.perf_counter() - t)       # the first step warms up
    times.sort()
    return BATCH * SEQ_LEN / times[len(times) // 2], model.n_params()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--train-steps", type=int, default=4)
    args = ap.parse_args()
    print(f"# bench_gemm: torch {torch.__version__}, {args.threads} threads, CPU extensions: {vector_extensions()}; "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    peak = 0.0
    with intra_op_threads(args.threads):
        for K, N in SHAPES:
            flops = 2 * M * K * N
            row = {name: flops / best_seconds(fn, args.repeats) / 1e9 for name, fn in gemm_runners(K, N, args.threads).items()}
            peak = max(peak, *row.values())
            print(f"M={M} K={K:<5} N={N:<5} GFLOP/s: " + "  ".join(f"{k} {v:6.1f}" for k, v in row.items()), flush=True)
        tok_s, n = train_tok_s(args.train_steps)
    gflops = 6 * n * tok_s / 1e9
    print(f"train (6 x 512, batch {BATCH} x {SEQ_LEN}): {tok_s:.0f} tok/s = {gflops:.1f} GFLOP/s by 6N "
          f"= {100 * gflops / peak:.0f}% of the best GEMM measured here ({peak:.1f} GFLOP/s); "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
