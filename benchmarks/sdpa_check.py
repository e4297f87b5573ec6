"""Which scaled-dot-product-attention backends survive forward + backward at the bases' training shapes.

FLUX LoRA training on the H200 failed in backward with "an illegal memory access" (torch 2.11+cu130)
in both the studio's loop and a plain peft loop. This script runs, for each attention shape the
studio trains at (FLUX.1 at 1024 px: 24 heads x 128, 4096 image + 512 text tokens; SDXL at 1024 px:
its 64 x 64 and 32 x 32 self-attention and 77-token cross-attention) and each SDPA backend (torch's
default choice, cuDNN, flash, memory-efficient, math), one bf16 forward + backward **in its own
process** (an illegal access poisons the CUDA context it happens in) and reports: ok, non-finite
gradients, or the error; with the gradient's error against the math backend in fp32.

    GPU:  python benchmarks/sdpa_check.py
"""

from __future__ import annotations

import json
import subprocess
import sys

SHAPES = {  # name: (batch, heads, query tokens, key tokens, head dim)
    "flux1 1024px joint, batch 1": (1, 24, 4608, 4608, 128),
    "flux1 1024px joint, batch 4": (4, 24, 4608, 4608, 128),
    "sdxl 1024px self 64x64, batch 4": (4, 10, 4096, 4096, 64),
    "sdxl 1024px cross 32x32 x 77, batch 4": (4, 20, 1024, 77, 64),
}
BACKENDS = ["default", "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]

CHILD = r"""
import json, sys, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
b, h, lq, lk, d = json.loads(sys.argv[1]); backend = sys.argv[2]
torch.manual_seed(0)
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (lq, lk, lk))
grad = torch.randn(b, h, lq, d, device="cuda", dtype=torch.bfloat16)
def run(q, k, v):
    out = F.scaled_dot_product_attention(q, k, v)
    out.backward(grad.to(out.dtype))
    return q.grad
if backend == "default":
    dq = run(q, k, v)
else:
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        dq = run(q, k, v)
torch.cuda.synchronize()
finite = bool(torch.isfinite(dq).all())
ref_q = q.detach()[:1, :2].float().requires_grad_(True)
ref_k, ref_v = (t.detach()[:1, :2].float() for t in (k, v))
with sdpa_kernel([SDPBackend.MATH]):
    F.scaled_dot_product_attention(ref_q, ref_k, ref_v).backward(grad[:1, :2].float())
error = float((dq[:1, :2].float() - ref_q.grad).norm() / ref_q.grad.norm())
print(json.dumps({"finite": finite, "error": error}))
"""


def check(shape: tuple, backend: str) -> str:
    """One backend at one shape in a fresh process: 'ok (error e)', 'NON-FINITE dq' or the error line."""
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(shape), backend], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if "Error" in line or "error" in line]
        return "FAILED: " + (lines[-1] if lines else proc.stderr.strip()[-200:])[:160]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return f"ok (dq error vs fp32 math {result['error']:.1e})" if result["finite"] else "NON-FINITE dq"


def main() -> int:
    import torch

    print(f"# sdpa_check: torch {torch.__version__}, {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}")
    print("| shape (B, heads, Lq, Lk, d) | backend | forward + backward |")
    print("|---|---|---|")
    for name, shape in SHAPES.items():
        for backend in BACKENDS:
            print(f"| {name} {shape} | {backend} | {check(shape, backend)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
