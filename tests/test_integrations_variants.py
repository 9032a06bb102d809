"""Every fastsam optimizer (FusedSAM, LookSAM, GSAM, FriendlySAM, MomentumSAM) through real
Lightning (automatic optimization; manual optimization in the two-step and closure forms)
and through the Hugging Face Trainer (SAMTrainer for FusedSAM and its subclasses; the plain
Trainer for MomentumSAM, whose one pass per step is the Trainer's own loop), each bitwise
equal to the same calls on the bare optimizer in a plain loop, forward passes counted.

Lightning wraps the optimizer (LightningOptimizer) and the Trainer wraps it too
(accelerate's AcceleratedOptimizer): what a variant keeps from one pass or step to the
next must live where the wrapper cannot split it (FriendlySAM's EMA under manual
optimization ended 7e-3 away from the plain loop when it did not)."""

import warnings

import pytest
import torch

from .contract_cases import VARIANTS, build

pl = pytest.importorskip("lightning.pytorch")

STEPS, N_BATCHES, BS = 4, 2, 8  # LookSAM (k=2) takes two full and two reuse steps
TWO_STEP = [v for v in VARIANTS if v != "MomentumSAM"]


def _batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_BATCHES * BS, 4, generator=g)
    y = torch.randn(N_BATCHES * BS, 1, generator=g)
    return x, y


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _optimizer(name, params):
    return build(name, params, torch.optim.SGD, backend="foreach", lr=0.1, momentum=0.9)


def _same(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{n}: max |diff| {(p - q).abs().max()}"


# ------------------------------------------------------------------ one training step, each form
# The same function runs inside the LightningModule (backward = manual_backward) and in the plain
# loop (backward = Tensor.backward), so both make exactly the same calls on the optimizer.
def two_step(opt, loss_fn, backward):
    backward(loss_fn())  # first pass, at w
    if opt.sam_active:
        opt.first_step(zero_grad=True)  # w -> w + e
        backward(loss_fn())  # second pass, at w + e
    opt.step()  # restore + base step (a plain step while SAM is off)
    opt.zero_grad()


def closure_step(opt, loss_fn, backward):
    def closure():
        opt.zero_grad()
        loss = loss_fn()
        backward(loss)
        return loss

    opt.step(closure=closure)  # torch's convention: the closure runs a whole pass


def one_pass(opt, loss_fn, backward):  # MomentumSAM: the gradient at the weights as they are (w~)
    backward(loss_fn())
    opt.step()
    opt.zero_grad()


FORMS = {"two_step": two_step, "closure": closure_step, "one_pass": one_pass}
MANUAL = [(n, "two_step") for n in TWO_STEP] + [(n, "closure") for n in VARIANTS] + [("MomentumSAM", "one_pass")]


class Counted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.net(x)


def plain_loop(name, form):
    """The bare optimizer: ``form`` on each batch in order, an LR scheduler stepped after each step."""
    model = Counted()
    opt = _optimizer(name, model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)
    x, y = _batches()
    for i in range(STEPS):
        xb, yb = x[i % N_BATCHES * BS :][:BS], y[i % N_BATCHES * BS :][:BS]
        FORMS[form](opt, lambda: torch.nn.functional.mse_loss(model(xb), yb), torch.Tensor.backward)
        sched.step()
    return model, opt


# ------------------------------------------------------------------ Lightning
class Module(pl.LightningModule):
    """``form`` None: automatic optimization; otherwise manual optimization with that form."""

    def __init__(self, name, form=None):
        super().__init__()
        self.model = Counted()
        self.name, self.form = name, form
        self.automatic_optimization = form is None

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self.loss(batch)
        FORMS[self.form](self.optimizers(), lambda: self.loss(batch), self.manual_backward)
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = _optimizer(self.name, self.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(module):
    x, y = _batches()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BS, shuffle=False)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("error", ".*lr_scheduler.step.*")  # the schedulers see every optimizer step
        trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("name", VARIANTS)
def test_lightning_automatic_optimization_equals_the_plain_loop(name, one_thread):
    """Automatic optimization hands its closure (a whole forward and backward) to step(): the same as
    step(closure) under torch's convention on the bare optimizer, for every variant."""
    module = Module(name)
    trainer = _fit(module)
    model, opt = plain_loop(name, "closure")
    assert trainer.global_step == trainer.optimizers[0].num_steps == opt.num_steps == STEPS
    assert module.model.forwards == model.forwards
    _same(module.model, model)


@pytest.mark.parametrize("name,form", MANUAL)
def test_lightning_manual_optimization_equals_the_plain_loop(name, form, one_thread):
    module = Module(name, form)
    trainer = _fit(module)
    model, opt = plain_loop(name, form)
    assert trainer.global_step == trainer.optimizers[0].num_steps == opt.num_steps == STEPS
    assert module.model.forwards == model.forwards
    _same(module.model, model)
    if name == "FriendlySAM":  # its EMA went through the wrapper too
        theirs, mine = trainer.optimizers[0].state_dict()["fastsam"], opt.state_dict()["fastsam"]
        assert all(torch.equal(a, b) for a, b in zip(theirs["buffers"]["fsam_m"], mine["buffers"]["fsam_m"]))


# ------------------------------------------------------------------ Hugging Face Trainer
GA, N = 2, N_BATCHES * BS  # two micro-batches of 4 per optimizer step


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Counted()

    def forward(self, x, labels=None):
        pred = self.model(x)
        return {"loss": torch.nn.functional.mse_loss(pred, labels), "logits": pred}


def _hf_data():
    x, y = _batches()
    return [{"x": x[i], "labels": y[i]} for i in range(len(x))]


def _hf_args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=N // (2 * GA),
        gradient_accumulation_steps=GA,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        logging_steps=STEPS,
    )


def _hf_trainer(base_cls, name, tmp_path):
    """``base_cls`` (SAMTrainer or transformers.Trainer) reading the batches in order."""

    class InOrder(base_cls):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    model = Tiny()
    opt = build(name, model.parameters(), torch.optim.SGD, backend="foreach", lr=0.1, momentum=0.9)
    return InOrder(model=model, args=_hf_args(tmp_path), train_dataset=_hf_data(), optimizers=(opt, None)), model, opt


def _hf_plain_loop(name):
    """The gradient-accumulation recipe on the bare optimizer: each pass accumulates over the window's
    micro-batches (loss / GA), the second pass only while SAM is active."""
    model = Tiny()
    opt = build(name, model.parameters(), torch.optim.SGD, backend="foreach", lr=0.1, momentum=0.9)
    data = _hf_data()
    x, y = torch.stack([d["x"] for d in data]), torch.stack([d["labels"] for d in data])
    micro = list(zip(x.split(N // (2 * GA)), y.split(N // (2 * GA))))
    for s in range(STEPS):
        window = [micro[(s * GA + i) % len(micro)] for i in range(GA)]

        def accumulate():
            for xb, yb in window:
                (model(xb, yb)["loss"] / GA).backward()

        accumulate()
        if name != "MomentumSAM" and opt.sam_active:
            opt.first_step(zero_grad=True)
            accumulate()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("name", VARIANTS)
def test_hugging_face_trainer_equals_the_plain_loop(name, tmp_path, one_thread):
    """SAMTrainer for FusedSAM and its subclasses (LookSAM's reuse steps are the Trainer's plain steps),
    the plain Trainer for MomentumSAM (one pass per step is the Trainer's own loop)."""
    pytest.importorskip("transformers")
    from transformers import Trainer

    from fastsam.integrations.transformers import SAMTrainer

    trainer, model, opt = _hf_trainer(Trainer if name == "MomentumSAM" else SAMTrainer, name, tmp_path)
    trainer.train()
    ref, ref_opt = _hf_plain_loop(name)
    assert opt.num_steps == ref_opt.num_steps == trainer.state.global_step == STEPS
    assert model.model.forwards == ref.model.forwards
    _same(model, ref)


def test_sam_trainer_refuses_momentum_sam_by_name(tmp_path):
    pytest.importorskip("transformers")
    from fastsam.integrations.transformers import SAMTrainer

    with pytest.raises(TypeError, match="needs a FusedSAM.*got MomentumSAM"):
        _hf_trainer(SAMTrainer, "MomentumSAM", tmp_path)
