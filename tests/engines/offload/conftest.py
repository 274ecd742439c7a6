import pytest


@pytest.fixture
def small_chunks(monkeypatch):
    """The store's chunks at 4 KiB: tiny models' tensors span several (the tests use it module-wide)."""
    from slimtune.engines.offload import store

    monkeypatch.setattr(store, "CHUNK", 4096)


@pytest.fixture(scope="session")
def deep_tiny(tmp_path_factory):
    """A 6-layer random Llama (hidden 64) with tiny-llama's tokenizer: more layers than the engine's slabs at
    offload.prefetch=1, so layers leave memory after their forward and backward must load them again."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.formats.hf import load_tokenizer

    path = tmp_path_factory.mktemp("deep_tiny")
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(path)
    load_tokenizer("tiny-llama").save_pretrained(path)
    return str(path)
