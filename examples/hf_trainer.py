"""SAM in the Hugging Face Trainer: fastsam.integrations.transformers.SAMTrainer on a tiny
model (no download), with gradient accumulation, bf16 on the CPU and late-phase SAM.

    python examples/hf_trainer.py [--steps 20] [--out /tmp/sam_trainer]
"""

import argparse
import tempfile

import torch
from transformers import TrainingArguments

from fastsam.integrations.transformers import SAMTrainer


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))

    def forward(self, x, labels=None):
        logits = self.body(x).float()
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    y = (x[:, :5].sum(1) > 0).long()
    data = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    out = args.out or tempfile.mkdtemp(prefix="sam_trainer_")
    targs = TrainingArguments(
        output_dir=out,
        max_steps=args.steps,
        per_device_train_batch_size=32,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        optim="adamw_torch",
        weight_decay=0.01,
        bf16=True,
        use_cpu=True,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SAMTrainer(
        model=TinyClassifier(), args=targs, train_dataset=data, sam_rho=0.05, sam_start_fraction=0.5
    )  # plain AdamW for the first half, SAM after
    trainer.train()
    opt = trainer.sam_optimizer
    print(f"steps={opt.num_steps}  sam_start_step={opt.sam_start_step}  last log={trainer.state.log_history[-2]}")
    return trainer


if __name__ == "__main__":
    main()
