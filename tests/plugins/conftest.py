"""Toy plugins: each test file here adds one technique of one kind (an adapter, an adapter init, a quantized
format, an optimizer, a training precision, a pruning method, an engine, a hook, a checkpoint format) and
nothing else, and shows it selectable, validated, planned and trained. The `plug` fixture registers for one
test only (registries and config sections are dicts), so the toys never leak into other tests' choices."""

import pytest


@pytest.fixture
def plug():
    added = []

    def register(registry, name, obj):
        registry.register(name)(obj)
        added.append((registry, name))
        return obj

    yield register
    for registry, name in reversed(added):
        del registry[name]
