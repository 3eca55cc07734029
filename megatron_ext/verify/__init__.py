"""GPU verification: `python tools/gpu_verify.py --out DIR [--cpu-dry-run] [--sections ...]`.

Seven sections, each run as its own process (`python -m megatron_ext.verify --section SN`)
under its own time cap, each appending one JSON line to DIR/results.jsonl and re-rendering
DIR/summary.md (see `megatron_ext.verify.runner` for the caps and the run budget):

    S0 environment          GPU, driver, clocks, power cap; torch/CUDA/NCCL/DeepSpeed/triton
    S1 build                the compiled extensions for sm_90 only; the fused-ops status
    S2 gpu test tier        `pytest -m gpu tests`: counts, failures' names and first lines
    S3 train + resume       the `megatron-ext train` CLI in bf16; a 3 + 3 resumed run against
                            6 straight steps (loss difference < 1e-6)
    S4 attention backends   softmax / sdpa / flex x ALiBi / RoPE x head dims x seq lengths:
                            forward + backward time, peak memory, error against fp32
    S5 throughput           FinGPT-3B through the trainer against a plain PyTorch loop
                            (engine overhead), the plain step's top kernels
    S6 Llama + SDPA         a Llama shape (GQA, SwiGLU, RoPE) with SDPA through the trainer

`--cpu-dry-run` runs every section's code on tiny shapes on CPU (CI), without rebuilding.
The entry point is `megatron_ext.verify.runner.main(argv)`.
"""
