"""transformers.Trainer on a slimtune model: slimtune's adapter, optimizer, schedule, batches and loss.

python examples/hf_trainer.py                          # SmolLM2-135M, LoRA rank 16, 5 steps on pydoc
python examples/hf_trainer.py tiny-llama 3 float32     # model.name, steps, model.dtype
"""

import sys

import torch
from transformers import Trainer, TrainingArguments

import slimtune

name, steps, dtype = (sys.argv[1:] + ["smollm2-135m", "5", "auto"][len(sys.argv) - 1 :])[:3]
steps = int(steps)
torch.manual_seed(0)
model, tokenizer = slimtune.load(name, dtype=dtype)
slimtune.add_adapter(model, "lora", rank=16, alpha=32, target_modules="all-linear")
optimizer = slimtune.optimizer(model, "adamw", lr=1e-3)
scheduler = slimtune.lr_scheduler(optimizer, max_steps=30, warmup_steps=3)

# one row per sequence, in slimtune's order; the Trainer's sequential sampler keeps it
batches = slimtune.batches(tokenizer, steps, source="pydoc", eval_fraction=0.05, seq_len=256, batch_size=4)
rows = [
    {"input_ids": x[i], "labels": y[i], "position_ids": None if pos is None else pos[i]}
    for x, y, pos in batches
    for i in range(len(x))
]
losses = []


def compute_loss(outputs, labels, num_items_in_batch=None):
    loss = slimtune.hf_loss(outputs, labels, num_items_in_batch)
    losses.append(loss.item())
    print(f"step {len(losses)} loss {loss.item():.6f}")
    return loss


args = TrainingArguments(
    output_dir="runs/hf_trainer",
    per_device_train_batch_size=4,
    max_steps=steps,
    max_grad_norm=1.0,
    train_sampling_strategy="sequential",
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    remove_unused_columns=False,
    bf16=model.dtype == torch.bfloat16,
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=rows,
    data_collator=slimtune.hf_inputs,
    optimizers=(optimizer, scheduler),
    compute_loss_func=compute_loss,
)
trainer.train()
slimtune.save(model, "runs/hf_trainer/final", tokenizer)
