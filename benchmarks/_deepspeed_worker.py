"""DeepSpeed ZeRO-3 with parameters and AdamW state on NVMe ("ZeRO-Infinity"), fp32, for
benchmarks/offload_vs_deepspeed.py (run by it, one process; not part of slimtune).

Settings that really keep the parameters on disk (found on this machine kind): offload_param.max_in_cpu=0 (the
default keeps any model under 1B parameters in RAM), stage3_max_reuse_distance=0 (else "Not enough buffers" at
step 2), a parameter swap buffer that holds the embedding; pipeline_read/write off (slower here, 2x the RAM).
Memory knobs tried at 1B: sub_group_size 1.05 x embedding / 5e7 (16.0 / 15.7 GB peak, 32.6 / 33.3 s/step);
2 optimizer swap buffers fail ("range() arg 3 must not be zero"), so 5 parameter and 4 optimizer buffers."""

import json
import os
import resource
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29511")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")


def io_bytes() -> tuple[int, int]:
    f = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    return int(f["read_bytes"]), int(f["write_bytes"])


def main(
    model_dir: str,
    nvme: str,
    steps: int,
    seq: int,
    out: str,
    sub_group: float = 5e7,
    param_buffers: int = 5,
    optimizer_buffers: int = 4,
) -> None:
    import torch
    import torch._dynamo  # noqa: F401  (imported before zero.Init patches tensor construction; it breaks after)
    import transformers.masking_utils  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama import modeling_llama  # noqa: F401

    import deepspeed

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(model_dir)
    vocab_params = cfg.vocab_size * cfg.hidden_size
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(os.environ.get("BENCH_MAX_GRAD_NORM", "0")),
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {
                "device": "nvme",
                "nvme_path": nvme,
                "pin_memory": False,
                "buffer_count": param_buffers,
                "buffer_size": int(vocab_params * 1.05),
                "max_in_cpu": 0,
            },
            "offload_optimizer": {
                "device": "nvme",
                "nvme_path": nvme,
                "pin_memory": False,
                "buffer_count": optimizer_buffers,
                "pipeline_read": False,
                "pipeline_write": False,
            },
            "stage3_max_live_parameters": int(vocab_params * 1.05),
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": int(5e7),
            "stage3_param_persistence_threshold": int(1e5),
            "sub_group_size": int(sub_group),
        },
        "aio": {
            "block_size": 1048576,
            "queue_depth": 8,
            "thread_count": 1,
            "single_submit": False,
            "overlap_events": True,
        },
        "wall_clock_breakdown": False,
    }
    t0 = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo")
    with deepspeed.zero.Init(config_dict_or_path=ds, remote_device="nvme"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    init_seconds = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    rows = []
    for step in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=g)
        r0, w0 = io_bytes()
        t = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        r1, w1 = io_bytes()
        rows.append(
            {
                "step": step + 1,
                "seconds": time.perf_counter() - t,
                "loss": float(loss),
                "read_bytes": r1 - r0,
                "written_bytes": w1 - w0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(out, "w") as f:
        json.dump(
            {"init_seconds": init_seconds, "steps": rows, "peak_rss_bytes": peak, "deepspeed": deepspeed.__version__},
            f,
            indent=1,
        )


if __name__ == "__main__":
    main(
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5],
        *(float(x) if i == 0 else int(x) for i, x in enumerate(sys.argv[6:])),
    )
