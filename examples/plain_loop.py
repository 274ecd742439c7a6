"""A plain PyTorch loop built from slimtune's Python API: the same first losses as `slimtune run lora`.

python examples/plain_loop.py                          # SmolLM2-135M, LoRA rank 16, 5 steps on pydoc
python examples/plain_loop.py tiny-llama 5 float32     # model.name, steps, model.dtype
"""

import sys

import torch

import slimtune

name, steps, dtype = (sys.argv[1:] + ["smollm2-135m", "5", "auto"][len(sys.argv) - 1 :])[:3]
steps = int(steps)
torch.manual_seed(0)  # train.seed: slimtune run seeds before it builds the adapter
model, tokenizer = slimtune.load(name, dtype=dtype)
slimtune.add_adapter(model, "lora", rank=16, alpha=32, target_modules="all-linear")
optimizer = slimtune.optimizer(model, "adamw", lr=1e-3)
scheduler = slimtune.lr_scheduler(optimizer, max_steps=30, warmup_steps=3)
params = [p for p in model.parameters() if p.requires_grad]

model.train()
batches = slimtune.batches(tokenizer, steps, source="pydoc", eval_fraction=0.05, seq_len=256, batch_size=4)
for step, (input_ids, labels, position_ids) in enumerate(batches):
    loss = slimtune.loss(model, input_ids, labels, position_ids)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    print(f"step {step + 1} loss {loss.item():.6f}")
slimtune.save(model, "runs/plain_loop/final", tokenizer)
