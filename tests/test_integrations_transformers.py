"""fastsam.integrations.transformers.SAMTrainer (transformers from PyPI, CPU): two passes
per step (one while SAM is inactive), equal to the plain gradient-accumulation recipe,
FusedSAM via optimizers= or built from SAM arguments, bf16, sam_loss logged, resume."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import TrainingArguments

from fastsam import FusedSAM
from fastsam.integrations.transformers import SAMTrainer

N, BS, GA = 16, 4, 2  # 2 optimizer steps per epoch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 8)
        self.out = torch.nn.Linear(8, 1)
        self.forwards = 0

    def forward(self, x, labels=None):
        self.forwards += 1
        pred = self.out(torch.tanh(self.lin(x))).float()
        return {"loss": torch.nn.functional.mse_loss(pred, labels), "logits": pred}


def _dataset():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 4, generator=g), torch.randn(N, 1, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(N)]


class Seq(SAMTrainer):
    def _get_train_sampler(self, *a, **k):  # the batches in order, to compare with a plain loop
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _args(tmp_path, steps, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=BS,
        gradient_accumulation_steps=GA,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _reference(steps, sam_start_step=None):
    model = Tiny()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, sam_start_step=sam_start_step)
    data = _dataset()
    x = torch.stack([d["x"] for d in data])
    y = torch.stack([d["labels"] for d in data])
    micro = list(zip(x.split(BS), y.split(BS)))
    for s in range(steps):
        window = [micro[(s * GA + i) % len(micro)] for i in range(GA)]
        for xb, yb in window:
            (model(xb, yb)["loss"] / GA).backward()
        if opt.sam_active:
            opt.first_step(zero_grad=True)
            for xb, yb in window:
                (model(xb, yb)["loss"] / GA).backward()
        opt.second_step(zero_grad=True)
    return model


def _close(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sam_start_step", [None, 1])
def test_sam_trainer_equals_the_accumulation_recipe(tmp_path, sam_start_step):
    model = Tiny()
    tr = Seq(
        model=model, args=_args(tmp_path, 3), train_dataset=_dataset(), sam_rho=0.05, sam_start_step=sam_start_step
    )
    tr.train()
    opt = tr.sam_optimizer
    inactive = sam_start_step or 0
    assert opt.num_steps == tr.state.global_step == 3
    assert model.forwards == GA * (inactive + 2 * (3 - inactive))
    assert type(opt.base_optimizer) is torch.optim.SGD
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert len(logged) == 3 and ("sam_loss" in logged[-1]) and ("sam_loss" not in logged[0]) == bool(inactive)
    _close(model, _reference(3, sam_start_step))


def test_fused_sam_passed_in_optimizers(tmp_path):
    model = Tiny()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05)
    tr = Seq(model=model, args=_args(tmp_path, 2), train_dataset=_dataset(), optimizers=(opt, None))
    tr.train()
    assert opt.num_steps == 2 and model.forwards == 2 * GA * 2
    _close(model, _reference(2))
    with pytest.raises(TypeError, match="FusedSAM"):
        SAMTrainer(
            model=model,
            args=_args(tmp_path, 2),
            train_dataset=_dataset(),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )


def test_start_fraction_bf16_and_adamw(tmp_path):
    model = Tiny()
    tr = SAMTrainer(
        model=model,
        args=_args(tmp_path, 4, bf16=True, optim="adamw_torch", weight_decay=0.01),
        train_dataset=_dataset(),
        sam_rho=0.1,
        sam_start_fraction=0.5,
    )
    tr.train()
    opt = tr.sam_optimizer
    assert opt.sam_start_step == 2 and opt.num_steps == 4 and type(opt.base_optimizer) is torch.optim.AdamW
    assert model.forwards == GA * (2 + 2 * 2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_resume_across_the_switch(tmp_path):
    full = Tiny()
    Seq(model=full, args=_args(tmp_path / "a", 4), train_dataset=_dataset(), sam_start_step=3).train()
    first = Tiny()
    Seq(
        model=first,
        args=_args(tmp_path / "b", 4, save_strategy="steps", save_steps=2),
        train_dataset=_dataset(),
        sam_start_step=3,
    ).train()
    resumed = Tiny()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    tr = Seq(model=resumed, args=_args(tmp_path / "b", 4), train_dataset=_dataset(), sam_start_step=3)
    tr.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert tr.sam_optimizer.num_steps == 4
    assert resumed.forwards == GA * (1 + 2)  # step 3 inactive, step 4 SAM
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
