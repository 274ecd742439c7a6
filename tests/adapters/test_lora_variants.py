"""LoRA variants against PEFT and independent references: rsLoRA, DoRA (plain and NF4 bases), PiSSA (PEFT's own
init; the converted save on the original base; the quantized residual on NF4), LoRA+ (one SGD step by hand)."""

import json

import pytest
import torch
import torch.nn as nn

from slimtune import config as C
from slimtune.adapters import adapter_modules, apply_adapters
from slimtune.adapters.dora import DoRALinear
from slimtune.adapters.lora import LoRALinear
from slimtune.formats.peft import load_peft_adapter, save_peft_adapter
from slimtune.adapters.pissa import apply_pissa
from slimtune.model.quantize import decomposition_of
from slimtune.adapters.lora import LoRAConfig
from slimtune.config import AdapterConfig, OptimConfig
from slimtune.errors import ConfigError
from slimtune.formats.hf import load_model
from slimtune.optim import build_optimizer, set_lr
from slimtune.quant import quantize_model, quantize_nf4
from slimtune_testutil import TINY, run_cli

X = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
RANK, ALPHA = 4, 16.0


@pytest.fixture
def peft():
    """PEFT, for the tests that compare with it (the rest run without it)."""
    return pytest.importorskip("peft")


def _configs(**adapter):
    """(adapter section, lora section) of keys from either (use_rslora is LoRA's)."""
    lora = {k: adapter.pop(k) for k in list(adapter) if k in ("use_rslora",)}
    return AdapterConfig(**adapter), LoRAConfig(rank=RANK, alpha=ALPHA, **lora)


def _adapted(**adapter):
    torch.manual_seed(0)
    model = load_model("tiny-llama")
    cfg, lora = _configs(**adapter)
    apply_adapters(model, cfg, lora)
    return model, lora


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _sgd_steps(model, steps=2, lr=0.5):
    """Real optimizer steps (the first moves B only, the second A too)."""
    opt = build_optimizer(OptimConfig(name="sgd"), _trainable(model), lr)
    model.train()
    for _ in range(steps):
        model(input_ids=X, labels=X).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.mark.parametrize(
    "adapter",
    [
        {"use_rslora": True},
        {"type": "dora"},
        {"type": "dora", "use_rslora": True},
        {"init": "pissa"},
        {"init": "pissa", "use_rslora": True},
    ],
)
def test_trained_variant_loads_in_peft_with_same_logits(tmp_path, tiny_model_dir, adapter, peft):
    model, cfg = _sgd_steps(_adapted(**adapter)[0]), _configs(**adapter)[1]
    save_peft_adapter(model, cfg, tmp_path / "a", "tiny-llama", str(tiny_model_dir))
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    pissa, rslora = adapter.get("init") == "pissa", adapter.get("use_rslora", False)
    assert saved["use_rslora"] is rslora and saved["use_dora"] is (adapter.get("type") == "dora")
    # PiSSA is saved converted: rank 2r on the original base, alpha x 2 (x sqrt 2 with rsLoRA): same scaling
    assert saved["r"] == (2 * RANK if pissa else RANK)
    assert saved["lora_alpha"] == pytest.approx(ALPHA * (2**0.5 if rslora else 2) if pissa else ALPHA)
    ours = _logits(model)
    theirs = _logits(peft.PeftModel.from_pretrained(load_model("tiny-llama").eval(), str(tmp_path / "a")).eval())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    again = load_model("tiny-llama").eval()
    load_peft_adapter(again, tmp_path / "a")
    torch.testing.assert_close(_logits(again), ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, _logits(load_model("tiny-llama").eval()), atol=1e-3)


def test_dora_saved_by_peft_loads_and_trains_as_in_peft(tmp_path, peft):
    """A DoRA adapter made by PEFT (dropout 0.1, trained-looking B and magnitude): slimtune's loader gives its
    logits in eval, and in training (dropout on, same seed) the same logits and gradients."""
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.1,
        use_dora=True,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    pm = peft.get_peft_model(load_model("tiny-llama"), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.mul_(1.1).add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(tmp_path / "peft")
    ours = load_model("tiny-llama")
    names = load_peft_adapter(ours, tmp_path / "peft")
    assert all(isinstance(m, DoRALinear) for m in adapter_modules(ours).values()) and len(names) == 6
    torch.testing.assert_close(_logits(ours.eval()), _logits(pm.eval()), rtol=1e-5, atol=1e-5)
    for m in adapter_modules(ours).values():  # the loader builds adapters to score (no dropout, frozen)
        m.dropout = nn.Dropout(0.1)
        for p in m.trainable_parameters():
            p.requires_grad_(True)
    w = torch.randn(2, 24, 512)
    outs = []
    for model in (ours, pm):
        model.train()
        torch.manual_seed(5)
        logits = model(input_ids=X).logits
        (logits * w).sum().backward()
        outs.append(logits.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for name, m in adapter_modules(ours).items():
        layer = pm.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            m.lora_magnitude_vector.grad, layer.lora_magnitude_vector["default"].weight.grad, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(m.lora_A.weight.grad, layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)


def test_pissa_init_is_peft_s_and_keeps_the_model(peft):
    model, _ = _adapted(init="pissa")
    pm = peft.get_peft_model(
        load_model("tiny-llama"),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="pissa", target_modules="all-linear"),
    )
    modules = adapter_modules(model)
    assert len(modules) == 14
    for name, m in modules.items():
        layer = pm.base_model.model.get_submodule(name)
        torch.testing.assert_close(m.lora_A.weight, layer.lora_A["default"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(m.lora_B.weight, layer.lora_B["default"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(m.base.weight, layer.base_layer.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model.eval()), _logits(load_model("tiny-llama").eval()), rtol=0, atol=1e-4)


def test_dora_on_nf4_is_the_formula_on_the_dequantized_weight_and_trains():
    torch.manual_seed(0)
    full = load_model("tiny-llama")
    W = full.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = load_model("tiny-llama")
    quantize_model(model, "nf4")
    apply_adapters(model, AdapterConfig(type="dora"), LoRAConfig(rank=RANK, alpha=ALPHA))
    m = model.model.layers[0].self_attn.q_proj
    Wq = quantize_nf4(W, 64, True).dequantize(torch.float32)  # the NF4 base, by NF4's own quantizer
    torch.testing.assert_close(m.lora_magnitude_vector.detach(), Wq.norm(dim=1), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        m.lora_B.weight.normal_(0, 0.1)
        m.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(W.shape[0]))
    x = torch.randn(3, 5, 64)
    w = Wq + (ALPHA / RANK) * m.lora_B.weight.detach() @ m.lora_A.weight.detach()
    want = (m.lora_magnitude_vector.detach() / w.norm(dim=1))[:, None] * w
    torch.testing.assert_close(m.eval()(x), x @ want.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W + m.delta_weight() - (W - Wq), want, rtol=1e-5, atol=1e-5)
    opt = build_optimizer(OptimConfig(), _trainable(model), 1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=X, labels=X).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_pissa_on_nf4_quantizes_the_residual():
    """At init: base = NF4(W - s B A) with s B A the rank-r SVD part of W (float64 SVD here), and the model equals
    the plain model with weights NF4(W - s B A) + s B A."""
    cfg = C.load_config(
        "lora",
        ["model.name=tiny-llama", "quant.method=nf4", "adapter.init=pissa", f"lora.rank={RANK}", f"lora.alpha={ALPHA}"],
    )
    model, ref = load_model("tiny-llama"), load_model("tiny-llama")
    apply_pissa(model, decomposition_of(cfg).setup, log=lambda s: None)
    modules = adapter_modules(model)
    assert len(modules) == 14 and all(type(m) is LoRALinear for m in modules.values())
    for name, m in modules.items():
        W = ref.get_submodule(name).weight.detach()
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        low = m.scaling * m.lora_B.weight.detach() @ m.lora_A.weight.detach()
        torch.testing.assert_close(low.double(), (U[:, :RANK] * S[:RANK]) @ Vh[:RANK], rtol=0, atol=1e-5)
        Q = quantize_nf4(W - low, 64, True).dequantize(torch.float32)
        torch.testing.assert_close(m.base.dequantize_weight(torch.float32), Q, rtol=0, atol=0)
        with torch.no_grad():
            ref.get_submodule(name).weight.copy_(Q + low)
    torch.testing.assert_close(_logits(model.eval()), _logits(ref.eval()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_backward", [False, True])
def test_lora_plus_steps_b_ratio_times_faster(in_backward):
    """One SGD step (no momentum): A' = A - lr gA, B' = B - ratio lr gB, from the gradients taken here."""
    torch.manual_seed(0)
    lr, ratio = 0.1, 16.0
    x = torch.randn(8, 16)
    base = nn.Linear(16, 12)
    results = {}
    for r in (0.0, ratio):
        torch.manual_seed(1)
        m = LoRALinear(base, RANK, ALPHA)
        nn.init.normal_(m.lora_B.weight, std=0.3)
        A0, B0 = m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone()
        named = [("proj.lora_A.weight", m.lora_A.weight), ("proj.lora_B.weight", m.lora_B.weight)]
        opt = build_optimizer(OptimConfig(name="sgd", lora_plus_ratio=r, in_backward=in_backward), named, lr)
        gA, gB = torch.autograd.grad(m(x).square().sum(), [m.lora_A.weight, m.lora_B.weight])
        m(x).square().sum().backward()  # in_backward: each parameter steps as its gradient arrives
        if not in_backward:
            opt.step()
        torch.testing.assert_close(m.lora_A.weight.detach(), A0 - lr * gA)
        torch.testing.assert_close(m.lora_B.weight.detach(), B0 - (r or 1.0) * lr * gB)
        results[r] = (m.lora_A.weight.detach() - A0, m.lora_B.weight.detach() - B0)
        set_lr(opt, 0.01)  # the trainer's schedule: every group at lr x its lr_scale
        assert {g["lr"] for g in opt.param_groups} == ({0.01} if not r else {0.01, 0.01 * ratio})
    torch.testing.assert_close(results[ratio][0], results[0.0][0])
    torch.testing.assert_close(results[ratio][1], ratio * results[0.0][1])


def test_lora_plus_groups_dora_magnitude_with_b_as_peft():
    model, _ = _adapted(type="dora", target_modules=("q_proj",))
    opt = build_optimizer(OptimConfig(lora_plus_ratio=16.0), _trainable(model), 1e-3)
    fast = {id(p) for g in opt.param_groups if g["lr_scale"] == 16.0 for p in g["params"]}
    for n, p in _trainable(model):
        assert (id(p) in fast) == ("lora_B" in n or "magnitude" in n), n


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            ["adapter.type=dora", "adapter.init=pissa"],
            "adapter.init=pissa needs plain LoRA factors .*, which adapter.type=dora does not give",
        ),
        (["optim.lora_plus_ratio=-1"], "optim.lora_plus_ratio=-1.0 must be >= 0"),
        (
            ["adapter.type=none", "optim.lora_plus_ratio=16"],
            "optim.lora_plus_ratio=16.0 needs LoRA factors .*, which adapter.type=none",
        ),
        (["adapter.type=none", "lora.use_rslora=true"], "lora.use_rslora=true"),
        (
            ["adapter.init=pissa", "engine.name=offload"],
            "engine.name=offload needs every other technique to work on one streamed layer .*, "
            "which adapter.init=pissa does not give",
        ),
        (
            ["adapter.type=dora", "engine.name=offload"],
            "adapter.type=dora needs the whole frozen base weight in its "
            "forward, which engine.name=offload does not give",
        ),
        (
            ["adapter.init=pissa", "quant.method=lq_lora", "adapter.type=lq_lora"],
            "adapter.init=pissa needs plain LoRA factors .*, which adapter.type=lq_lora",
        ),
    ],
)
def test_bad_combinations_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
        C.load_config("lora", overrides)


def test_pissa_rank_beyond_half_the_smallest_dim_is_refused():
    with pytest.raises(ConfigError, match=r"lora.rank=17 with adapter.init=pissa.*lora.rank<=16"):
        apply_adapters(load_model("tiny-llama"), AdapterConfig(init="pissa"), LoRAConfig(rank=17))


def test_cli_runs_dora_and_peft_loads_it(tmp_path, peft):
    out = tmp_path / "dora"
    run_cli(
        "-m",
        "slimtune",
        "run",
        "lora",
        "adapter.type=dora",
        "model.name=tiny-llama",
        "train.max_steps=3",
        "optim.lora_plus_ratio=16",
        *TINY,
        f"output_dir={out}",
    )
    saved = json.loads((out / "final" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    pm = peft.PeftModel.from_pretrained(load_model("tiny-llama"), str(out / "final"))
    assert any("lora_magnitude_vector" in n for n, _ in pm.named_parameters())


def test_cli_refuses_a_bad_ratio_in_one_line(tmp_path):
    r = run_cli(
        "-m", "slimtune", "run", "lora", "optim.lora_plus_ratio=-2", f"output_dir={tmp_path / 'x'}", check=False
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert r.returncode == 2 and len(lines) == 1 and "optim.lora_plus_ratio=-2.0" in lines[0], r.stderr
