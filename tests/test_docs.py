"""The examples in the documentation run: every doctest of kvmmap's modules and every
```python block of README.md and docs/*.md.

Each runs in a temporary directory (examples create files such as "prompt.kvm"). The
blocks of one document run in order in one namespace, as a reader would type them. A block
that needs something this machine lacks (torch and transformers, an OpenCL device) is
skipped with the reason.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

import kvmmap

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS_TORCH = ("kvmmap.integrations",)


def module_names() -> list[str]:
    names = ["kvmmap"]
    for m in pkgutil.walk_packages(kvmmap.__path__, "kvmmap."):
        names.append(m.name)
    return sorted(names)


def need_torch():
    for mod in ("torch", "transformers"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")


@pytest.mark.parametrize("name", module_names())
def test_doctests(name, tmp_path, monkeypatch):
    if name.startswith(NEEDS_TORCH):
        need_torch()
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for t in tests:
        runner.run(t, out=report.append)
    assert runner.failures == 0, "".join(report)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    text = path.read_text()
    return [(text[:m.start()].count("\n") + 2, m[1]) for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


def skip_reason(code: str) -> str | None:
    if "transformers" in code or "torch" in code:
        for mod in ("torch", "transformers"):
            if importlib.util.find_spec(mod) is None:
                return f"the block needs {mod}, which is not installed"
    if 'backend="opencl"' in code:
        from kvmmap import opencl
        return opencl.unavailable_reason()
    return None


def tiny_model():
    """A randomly initialised small Llama and token ids for blocks that use ``model``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    prompt_ids = torch.randint(0, 128, (1, 20))
    return {"model": model, "prompt_ids": prompt_ids,
            "new_ids": torch.cat([prompt_ids, torch.randint(0, 128, (1, 5))], dim=1)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_markdown_python_blocks_run(doc, tmp_path, monkeypatch):
    blocks = python_blocks(doc)
    if not blocks:
        pytest.skip(f"{doc.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_example__"}
    skipped = []
    for line, code in blocks:
        reason = skip_reason(code)
        if reason:
            skipped.append(f"{doc.name}:{line}: {reason}")
            continue
        if "model" in code and "model" not in namespace:
            namespace.update(tiny_model())
        try:
            exec(compile(code, f"{doc.name}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the block at {doc.name}:{line} fails: {type(e).__name__}: {e}") from e
    if skipped:
        pytest.skip("; ".join(skipped))
