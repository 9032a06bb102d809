"""FusedSAM in a plain loop with fp16 autocast and torch.amp.GradScaler (CPU or CUDA), with
gradient accumulation: both passes accumulate over the micro-batches.

    python examples/plain_amp.py [--steps 30] [--accum 2]
"""

import argparse

import torch

from fastsam import FusedSAM


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(512, 20, device=device)
    y = (x[:, :5].sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).to(device)
    opt = FusedSAM(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
        rho=0.05,
        max_grad_norm=5.0,
        sam_start_step=args.steps // 3,
    )  # late-phase SAM: plain steps first
    scaler = torch.amp.GradScaler(device)

    def loss_of(xb, yb):
        with torch.autocast(device, dtype=torch.float16):
            return torch.nn.functional.cross_entropy(model(xb), yb) / args.accum

    for step in range(args.steps):
        idx = torch.randint(0, len(x), (64 * args.accum,), device=device)
        micro = list(zip(x[idx].chunk(args.accum), y[idx].chunk(args.accum)))
        for xb, yb in micro:  # first pass, accumulated (scaled)
            scaler.scale(loss_of(xb, yb)).backward()
        if opt.sam_active:
            opt.first_step(zero_grad=True)  # g/||g|| does not depend on the loss scale
            for xb, yb in micro:  # second pass at w + e, accumulated
                scaler.scale(loss_of(xb, yb)).backward()
        scaler.step(opt)  # unscale + inf check inside the fused step; skips bitwise on inf
        scaler.update()
        opt.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            with torch.no_grad():
                acc = (model(x).argmax(1) == y).float().mean().item()
            print(
                f"step {step:3d}  sam={opt.sam_active}  scale={scaler.get_scale():.0f}  "
                f"skipped={opt.last_step_skipped}  acc={acc:.3f}"
            )
    return acc


if __name__ == "__main__":
    main()
