"""FusedSAM under Lightning's manual optimization: the two-step form, which also works
with fp16 ("16-mixed", GradScaler) since the second backward is yours.

``opt.step()`` after ``first_step`` finishes the SAM step (restore + base step, unscaled
inside the fused step under fp16) and counts in ``trainer.global_step``.

    python examples/lightning_manual.py [--steps 30] [--precision 16-mixed]
"""

import argparse

import lightning.pytorch as pl
import torch

from fastsam import FusedSAM


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x).float(), y)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.loss(batch)
        self.manual_backward(loss)  # first pass, at w
        if opt.sam_active:
            opt.first_step(zero_grad=True)  # w -> w + e
            self.manual_backward(self.loss(batch))  # second pass, at w + e
        opt.step()  # restore + base step (SAM gradient)
        opt.zero_grad()
        self.lr_schedulers().step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        opt = FusedSAM(self.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)]


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
    kw = {}
    if args.precision == "16-mixed" and not torch.cuda.is_available():
        # Lightning maps "16-mixed" to bf16 on the CPU; its plugin with a CPU GradScaler is real fp16
        from lightning.pytorch.plugins.precision import MixedPrecision

        kw["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    else:
        kw["precision"] = args.precision
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    trainer.fit(Model(), data())
    opt = trainer.optimizers[0]
    print(f"global_step={trainer.global_step}  FusedSAM steps={opt.num_steps}")
    return trainer


if __name__ == "__main__":
    main()
