"""Devices and links the throughput model (planner/throughput.py) reads: data, with sources.

Device: dense bf16 peak (no sparsity), HBM bandwidth, memory, from the vendors' data sheets:
- A100 SXM 40GB / 80GB: 312 TFLOP/s; 1,555 / 2,039 GB/s (NVIDIA A100 datasheet, 2021).
- H100 SXM5 80GB: 989 TFLOP/s, 3,350 GB/s (NVIDIA H100 datasheet).
- H200 SXM 141GB: 989 TFLOP/s, 4,800 GB/s (NVIDIA H200 datasheet).
- MI250X per GCD (one torch device; the package has two): 383 / 2 = 191.5 TFLOP/s,
  3,277 / 2 = 1,638 GB/s, 64 GB (AMD Instinct MI250X datasheet).

Links, per device and direction (what one rank can push while its peers do the same):
- nvidia: NVLink3 through NVSwitch on A100 nodes, 600 GB/s bidirectional = 300 per direction
  (H100/H200 NVLink4: 450); InfiniBand HDR 200 Gb/s, one NIC per GPU = 25 GB/s (DGX/HGX A100;
  NDR 400 Gb/s = 50 on H100/H200 nodes).
- jean-zay: the A100 nodes BLOOM-176B trained on (the BLOOM paper, "Infrastructure"): 4 Omni-
  Path 100 Gb/s links per node of 8 GPUs = 6.25 GB/s per GPU; used by the published-run checks.
- lumi: the two GCDs of one MI250X share 4 Infinity Fabric links, 200 GB/s per direction; GCDs
  of different packages 1-2 links, 50-100 GB/s; Slingshot-11, 4 x 200 Gb/s NICs per node of 8
  GCDs = 12.5 GB/s per GCD (LUMI documentation, "LUMI-G hardware").
- latency per collective step: 10 us in the node, 20 us across nodes (typical NCCL/RCCL small-
  message latencies; named here, not fitted).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.errors import UserError


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense bf16
    hbm_gb_s: float
    memory_gib: float
    family: str  # the matrix-efficiency constant it uses (throughput.MATMUL_EFFICIENCY)


DEVICES = {
    "a100-40gb": Device("a100-40gb", 312.0, 1555.0, 40.0, "nvidia-ampere"),
    "a100-80gb": Device("a100-80gb", 312.0, 2039.0, 80.0, "nvidia-ampere"),
    "h100": Device("h100", 989.0, 3350.0, 80.0, "nvidia-hopper"),
    "h200": Device("h200", 989.0, 4800.0, 141.0, "nvidia-hopper"),
    "mi250x-gcd": Device("mi250x-gcd", 191.5, 1638.0, 64.0, "amd-cdna2"),
}


@dataclass(frozen=True)
class Links:
    """GB/s per device per direction: inside a TP group (in a node), and across nodes."""

    name: str
    tp_gb_s: float  # the links a TP group of up to `fast_group` ranks uses
    fast_group: int  # ranks sharing the fastest links (MI250X: the 2 GCDs of a package)
    tp_wide_gb_s: float  # a TP group larger than fast_group
    inter_node_gb_s: float
    latency_intra_s: float = 10e-6
    latency_inter_s: float = 20e-6


LINKS = {
    "nvidia": Links("nvidia", 300.0, 8, 300.0, 25.0),  # A100 NVSwitch; HDR, a NIC per GPU
    "jean-zay": Links("jean-zay", 300.0, 8, 300.0, 6.25),  # 4 x Omni-Path 100 Gb/s per node
    "nvidia-ndr": Links("nvidia-ndr", 450.0, 8, 450.0, 50.0),  # H100/H200, NDR per GPU
    "lumi": Links("lumi", 200.0, 2, 50.0, 12.5),
    "generic": Links("generic", 100.0, 8, 100.0, 12.5),
}


def device(name: str) -> Device:
    try:
        return DEVICES[name]
    except KeyError:
        raise UserError(f"--device {name}: known devices are {', '.join(DEVICES)}") from None


def links_for(links: str, device_name: str) -> Links:
    """A profile's links (`planner_links`); Hopper devices on `nvidia` get NVLink4 and NDR."""
    if links == "nvidia" and device_name in ("h100", "h200"):
        return LINKS["nvidia-ndr"]
    return LINKS.get(links, LINKS["generic"])
