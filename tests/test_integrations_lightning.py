"""FusedSAM under Lightning (lightning from PyPI, CPU): automatic optimization (32-bit,
bf16; fp16 raises naming the recipe), manual optimization (two-step and closure forms,
fp16), trainer.global_step, schedulers, ModelCheckpoint + fit(ckpt_path=...) bitwise."""

import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from fastsam import FusedSAM  # noqa: E402

N_BATCHES, BS = 2, 8


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_BATCHES * BS, 4, generator=g)
    y = torch.randn(N_BATCHES * BS, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BS, shuffle=False)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


class Auto(pl.LightningModule):
    def __init__(self, sam_start_step=None, sched=True):
        super().__init__()
        self.net = _net()
        self.forwards = 0
        self.sam_start_step, self.sched = sam_start_step, sched

    def training_step(self, batch, batch_idx):
        self.forwards += 1
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        opt = FusedSAM(
            self.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05, sam_start_step=self.sam_start_step
        )
        if not self.sched:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.9), "interval": "step"},
        }


class Manual(Auto):
    def __init__(self, form="two_step", **kw):
        super().__init__(**kw)
        self.automatic_optimization = False
        self.form = form

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss_fn = lambda: Auto.training_step(self, batch, batch_idx)
        if self.form == "closure":

            def closure():
                opt.zero_grad()
                loss = loss_fn()
                self.manual_backward(loss)
                return loss

            opt.step(closure=closure)
        else:
            self.manual_backward(loss_fn())
            opt.first_step(zero_grad=True)
            self.manual_backward(loss_fn())
            opt.step()  # finishes the SAM step; counts in trainer.global_step
            opt.zero_grad()
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()


def _trainer(steps, **kw):
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def _reference(steps, sam_start_step=None, lr_decay=0.9):
    """The plain two-step loop over the same batches."""
    net = _net()
    opt = FusedSAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05, sam_start_step=sam_start_step)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, lr_decay)
    batches = list(_data())
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = lambda: torch.nn.functional.mse_loss(net(x), y)
        loss().backward()
        opt.first_step(zero_grad=True)
        loss().backward()
        opt.second_step(zero_grad=True)
        sched.step()
    return net


def _fit(module, steps, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")  # schedulers step cleanly
        warnings.filterwarnings("error", message=".*optimizer.step.*")
        trainer = _trainer(steps, **kw)
        trainer.fit(module, _data())
    return trainer


def _fp16_cpu():
    """Lightning turns precision="16-mixed" into bf16 on the CPU; its plugin with a CPU GradScaler is fp16."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def _same(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q), (p - q).abs().max()


@pytest.mark.parametrize("sam_start_step", [None, 2])
def test_automatic_optimization_is_sam(sam_start_step):
    m = Auto(sam_start_step)
    trainer = _fit(m, 4)
    opt = trainer.optimizers[0]
    inactive = 0 if sam_start_step is None else sam_start_step
    assert m.forwards == inactive + 2 * (4 - inactive)  # two passes per SAM step
    assert trainer.global_step == opt.num_steps == 4
    _same(m.net, _reference(4, sam_start_step))


def test_automatic_accumulation_names_the_recipe():
    m = Auto(sched=False)
    with pytest.raises(RuntimeError, match="accumulate_grad_batches.*manual optimization"):
        _fit(m, 2, accumulate_grad_batches=2)


def test_automatic_bf16():
    m = Auto(sched=False)
    trainer = _fit(m, 3, precision="bf16-mixed")
    assert m.forwards == 6 and trainer.global_step == trainer.optimizers[0].num_steps == 3


def test_automatic_fp16_names_the_recipe():
    m = Auto(sched=False)
    with pytest.raises(RuntimeError, match="16-mixed.*manual optimization"):
        _fit(m, 2, plugins=[_fp16_cpu()])


@pytest.mark.parametrize("form", ["two_step", "closure"])
def test_manual_optimization(form):
    m = Manual(form)
    trainer = _fit(m, 4)
    assert m.forwards == 8
    assert trainer.global_step == trainer.optimizers[0].num_steps == 4
    _same(m.net, _reference(4))


def test_manual_fp16_two_step():
    m = Manual("two_step", sched=False)
    trainer = _fit(m, 3, plugins=[_fp16_cpu()])
    opt = trainer.optimizers[0]
    assert trainer.global_step == opt.num_steps == 3 and m.forwards == 6
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_checkpoint_resume_bitwise_across_the_switch(tmp_path):
    full = Auto(sam_start_step=3)
    _fit(full, 6)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    first = Auto(sam_start_step=3)
    _fit(first, 2, callbacks=[ckpt], enable_checkpointing=True)
    path = next(tmp_path.glob("*step=2*.ckpt"))
    resumed = Auto(sam_start_step=3)
    torch.manual_seed(123)
    with torch.no_grad():  # different weights before the restore: the checkpoint must bring them back
        for p in resumed.parameters():
            p.add_(1.0)
    trainer = _trainer(6, enable_checkpointing=True, default_root_dir=tmp_path / "resumed")  # not the cwd
    trainer.fit(resumed, _data(), ckpt_path=str(path))
    assert trainer.global_step == trainer.optimizers[0].num_steps == 6
    assert resumed.forwards == 3 * 1 + 3 * 2 - 2  # steps 3..6: step 3 inactive, 4..6 SAM
    _same(full.net, resumed.net)
