"""Fused ops vs their PyTorch references: forward + backward time at BLOOM-like shapes.

    OMP_NUM_THREADS=2 python benchmarks/fused_ops.py --device cpu
    python benchmarks/fused_ops.py --device cuda --compile --attention   # on a GPU node

Shapes follow BLOOM-560m (hidden 1024 = 16 heads x 64, FFN 4096) at batch 4, seq 512 and 2048:
softmax on scores [b, np, s, s] with ALiBi and the causal mask (and once with a padding mask),
bias+GeLU on [s, b, 4096], LayerNorm/RMSNorm on [s, b, 1024], RoPE on [s, b, 16, 64].
Each timing is the median (or --stat min) of --reps runs of forward + backward, implementations
interleaved so that machine noise hits them alike. `reference` is the op's `*_reference` (what the fused path is
tested against); `native` is the plain torch call a model would make without megatron-ext, where
it differs (F.layer_norm / F.rms_norm / F.gelu in the input dtype). On GPU, --compile adds
torch.compile(reference) and --attention compares whole attention paths (see attention_cases).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_ext import ops, precision

HIDDEN, HEADS, FFN, BATCH = 1024, 16, 4096, 4
DTYPES = precision.DTYPES


@dataclass
class Case:
    op: str
    shape: str
    impls: dict[str, Callable[[], None]]  # name -> one forward + backward


def alibi_slopes(n: int) -> torch.Tensor:
    return torch.tensor([2 ** (-8 * (i + 1) / n) for i in range(n)], dtype=torch.float32)


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor):
    def run() -> None:
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)

    return run


def leaf(shape, dtype, device, scale=1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, device=device)).to(dtype).requires_grad_()


REFERENCES = {
    "scaled_alibi_softmax": ops.scaled_alibi_softmax_reference,
    "bias_gelu": ops.bias_gelu_reference,
    "layer_norm": ops.layer_norm_reference,
    "rms_norm": ops.rms_norm_reference,
    "apply_rotary": ops.apply_rotary_reference,
}
FUSED = {
    name: functools.partial(getattr(ops, name), use_fused=True)
    for name in ("scaled_alibi_softmax", "bias_gelu", "layer_norm", "rms_norm", "apply_rotary")
}


def op_cases(seq: int, dtype: torch.dtype, device: str, compiled: dict | None) -> list[Case]:
    """One Case per op; `call(fn, *inputs)` applies the op's fixed arguments to any variant."""
    specs = []  # (op, shape, inputs, call, native)
    scores = leaf((BATCH, HEADS, seq, seq), dtype, device, 4.0)
    slopes = alibi_slopes(HEADS).to(device)
    lengths = torch.tensor([seq, seq - seq // 8, seq // 2, seq - 1], device=device)
    pad = torch.arange(seq, device=device).view(1, seq) >= lengths.view(-1, 1)
    for mask, tag in ((None, ""), (pad.view(BATCH, 1, 1, seq), "+pad")):
        specs.append(
            (
                "scaled_alibi_softmax",
                f"[{BATCH},{HEADS},{seq},{seq}] causal+alibi{tag}",
                [scores],
                lambda fn, x, m=mask: fn(x, 0.125, slopes, True, m),
                None,
            )
        )
    x, bias = leaf((seq, BATCH, FFN), dtype, device), leaf((FFN,), dtype, device)
    specs.append(
        (
            "bias_gelu",
            f"[{seq},{BATCH},{FFN}] tanh",
            [x, bias],
            lambda fn, a, b: fn(a, b, "tanh"),
            lambda a, b: F.gelu(a + b, approximate="tanh"),
        )
    )
    x = leaf((seq, BATCH, HIDDEN), dtype, device)
    w, b = leaf((HIDDEN,), dtype, device), leaf((HIDDEN,), dtype, device)
    specs.append(
        (
            "layer_norm",
            f"[{seq},{BATCH},{HIDDEN}]",
            [x, w, b],
            lambda fn, a, ww, bb: fn(a, ww, bb, 1e-5),
            lambda a, ww, bb: F.layer_norm(a, (HIDDEN,), ww, bb, 1e-5),
        )
    )
    specs.append(
        (
            "rms_norm",
            f"[{seq},{BATCH},{HIDDEN}]",
            [x, w],
            lambda fn, a, ww: fn(a, ww, 1e-5),
            lambda a, ww: F.rms_norm(a, (HIDDEN,), ww, 1e-5),
        )
    )
    x = leaf((seq, BATCH, HEADS, HIDDEN // HEADS), dtype, device)
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), torch.rand(HIDDEN // HEADS // 2))
    emb = torch.cat((freqs, freqs), dim=-1).view(seq, 1, 1, -1).to(device)
    cos, sin = emb.cos(), emb.sin()
    specs.append(
        (
            "apply_rotary",
            f"[{seq},{BATCH},{HEADS},{HIDDEN // HEADS}]",
            [x],
            lambda fn, a: fn(a, cos, sin),
            None,
        )
    )

    cases = []
    for op, shape, inputs, call, native in specs:
        grad = torch.randn_like(inputs[0])
        variants = {"fused": FUSED[op], "reference": REFERENCES[op]}
        if compiled is not None:
            variants["compiled"] = compiled[op]
        impls = {
            name: fwd_bwd(functools.partial(call, fn), inputs, grad)
            for name, fn in variants.items()
        }
        if native is not None:
            impls["native"] = fwd_bwd(native, inputs, grad)
        cases.append(Case(op, shape, impls))
    return cases


def attention_cases(seq: int, dtype: torch.dtype, device: str) -> list[Case]:
    """Whole attention cores on GPU: which path to use is chosen from these numbers.

    ALiBi (BLOOM): baddbmm + fused softmax + bmm vs SDPA with the ALiBi bias + causal mask as
    a float attn_mask. RoPE (Llama): SDPA(is_causal=True) vs bmm + fused softmax + bmm.
    """
    hn = HIDDEN // HEADS
    q, k, v = (leaf((BATCH, HEADS, seq, hn), dtype, device) for _ in range(3))
    g = torch.randn_like(q)
    slopes = alibi_slopes(HEADS).to(device)
    scale = 1 / math.sqrt(hn)
    pos = torch.arange(seq, device=device)
    causal = pos.view(1, seq) > pos.view(seq, 1)
    bias = (slopes.view(HEADS, 1, 1) * pos.view(1, 1, seq)).masked_fill(causal, float("-inf"))
    bias = bias.to(dtype).unsqueeze(0)

    def ours(qq, kk, vv, alibi=True):
        scores = torch.matmul(qq, kk.transpose(-1, -2))
        probs = ops.scaled_alibi_softmax(
            scores, scale, slopes if alibi else None, True, use_fused=True
        )
        return torch.matmul(probs, vv)

    def sdpa_alibi(qq, kk, vv):
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=bias, scale=scale)

    def sdpa_causal(qq, kk, vv):
        return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale)

    shape = f"q,k,v [{BATCH},{HEADS},{seq},{hn}]"
    return [
        Case(
            "attention ALiBi",
            shape,
            {"fused": fwd_bwd(ours, [q, k, v], g), "sdpa": fwd_bwd(sdpa_alibi, [q, k, v], g)},
        ),
        Case(
            "attention RoPE",
            shape,
            {
                "fused": fwd_bwd(lambda a, b, c: ours(a, b, c, alibi=False), [q, k, v], g),
                "sdpa": fwd_bwd(sdpa_causal, [q, k, v], g),
            },
        ),
    ]


def time_case(case: Case, device: str, warmup: int, reps: int, stat: str) -> dict[str, float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for run in case.impls.values():
        for _ in range(warmup):
            run()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in case.impls}
    for _ in range(reps):
        for name, run in case.impls.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            samples[name].append(time.perf_counter() - t0)
    reduce = min if stat == "min" else statistics.median
    return {name: 1e3 * reduce(ts) for name, ts in samples.items()}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def format_row(case: Case, dname: str, t: dict[str, float], columns: list[str]) -> str:
    times = [f"{t[c]:.2f}" if c in t else "-" for c in columns]
    ratios = [f"{t[c] / t['fused']:.2f}x" if c in t else "-" for c in columns[1:]]
    return f"| {case.op} | {case.shape} | {dname} | " + " | ".join(times + ratios) + " |"


def run_table(args, columns: list[str], make_cases: Callable[[int, torch.dtype], list[Case]]):
    header = "| op | shape | dtype | " + " | ".join(f"{c} ms" for c in columns)
    header += " | " + " | ".join(f"{c}/fused" for c in columns[1:]) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for seq in args.seq:
        for dname in args.dtypes:
            cases = make_cases(seq, DTYPES[dname])
            for case in cases:
                if not args.ops or case.op in args.ops:
                    t = time_case(case, args.device, args.warmup, args.reps, args.stat)
                    print(format_row(case, dname, t, columns), flush=True)
            del cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--ops", nargs="+", help="only these ops (names as in the table)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--stat",
        default="median",
        choices=("median", "min"),
        help="min: best run, for a machine shared with other jobs (noise only adds time)",
    )
    p.add_argument("--compile", action="store_true", help="add torch.compile(reference) (GPU)")
    p.add_argument("--attention", action="store_true", help="add whole-attention paths (GPU)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible")
    # Meant for GPU: on CPU, Inductor compiles C++ per shape and the targets are against eager.
    compiled = (
        {name: torch.compile(fn, dynamic=False) for name, fn in REFERENCES.items()}
        if args.compile
        else None
    )
    side = "cpu" if args.device == "cpu" else "gpu"
    backends = {op: s[side] for op, s in ops.fused_ops_status().items()}
    alloc = {k: os.environ.get(k, "") for k in ("LD_PRELOAD", "MALLOC_CONF")}
    print(f"# {datetime.date.today()}, {device_name(args.device)}, torch {torch.__version__}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# backends: {backends}; allocator: {alloc}; load average {load}; {args.stat} of {args.reps}"
    )
    columns = ["fused", "reference", "native"] + (["compiled"] if args.compile else [])
    run_table(args, columns, lambda seq, dtype: op_cases(seq, dtype, args.device, compiled))
    if args.attention:
        print("\n# attention core: matmul + fused softmax + matmul (fused) vs SDPA")
        run_table(
            args, ["fused", "sdpa"], lambda seq, dtype: attention_cases(seq, dtype, args.device)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
