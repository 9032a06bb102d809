"""FusedSAM under Lightning's automatic optimization (32-bit or bf16).

Lightning calls ``optimizer.step(closure)`` with a closure that runs the whole
forward+backward; FusedSAM calls it twice per SAM step (at w and at w + e).
fp16 ("16-mixed") automatic optimization cannot run a second pass (Lightning runs the
closure itself, then ``scaler.step`` without it): use examples/lightning_manual.py.

    python examples/lightning_automatic.py [--steps 30] [--precision bf16-mixed]
"""

import argparse

import lightning.pytorch as pl
import torch

from fastsam import FusedSAM


class Model(pl.LightningModule):
    def __init__(self, sam_start_step=None):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        self.sam_start_step = sam_start_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = FusedSAM(
            self.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05, sam_start_step=self.sam_start_step
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data():
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    y = (x[:, :5].sum(1) > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precision", default="32")
    args = ap.parse_args(argv)
    model = Model(sam_start_step=args.steps // 3)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data())
    opt = trainer.optimizers[0]
    print(f"global_step={trainer.global_step}  FusedSAM steps={opt.num_steps}  sam_active={opt.sam_active}")
    return trainer


if __name__ == "__main__":
    main()
