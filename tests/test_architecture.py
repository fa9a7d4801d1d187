"""The import rules of docs/ARCHITECTURE.md, checked on the installed package with grimp.

* layers, bottom up: {formats, parallel, errors, _validate} < codecs < {core, pagetable,
  prefix} < {attention, opencl} < cache < compress < {tools, cli, integrations}; nothing
  imports upward, not even inside a function;
* nothing below the top layer imports torch or transformers;
* no module reads another module's ``_``-names (checked on the source text: ``x._name``
  where ``x`` is an imported module or a parameter named like one of kvmmap's objects).

grimp sees only Python modules: an import of a Cython extension (``from . import
_pagetable``) reads to it as an import of the package itself, so such imports are put back
on the extension module before the layers are checked.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

import kvmmap

grimp = pytest.importorskip("grimp", reason="the import rules are checked with grimp (pip install grimp)")

PACKAGE = pathlib.Path(kvmmap.__file__).parent
EXTENSIONS = {"_pagetable", "_attention", "_quant", "_pages"}

LAYERS = [  # top to bottom
    ("cli", "tools", "integrations", "__main__"),
    ("compress",),
    ("cache",),
    ("attention", "_attention", "opencl"),
    ("core", "pagetable", "_pagetable", "prefix"),
    ("codecs",),
    ("formats", "parallel", "errors", "_validate", "_version"),
]


def graph():
    g = grimp.build_graph("kvmmap", include_external_packages=True)
    for importer in sorted(g.find_modules_that_directly_import("kvmmap")):
        for detail in g.get_import_details(importer=importer, imported="kvmmap"):
            m = re.fullmatch(r"from (\.+)(\w*) import (_\w+)", detail["line_contents"].strip())
            if not (m and m.group(3) in EXTENSIONS):
                continue
            parts = importer.split(".")
            is_package = (PACKAGE.parent.joinpath(*parts) / "__init__.py").exists()
            base = parts if is_package else parts[:-1]
            base = base[:len(base) - (len(m.group(1)) - 1)] + ([m.group(2)] if m.group(2) else [])
            target = ".".join(base + [m.group(3)])
            g.add_module(target)
            g.remove_import(importer=importer, imported="kvmmap")
            g.add_import(importer=importer, imported=target, line_number=detail["line_number"],
                         line_contents=detail["line_contents"])
    return g


def test_every_module_is_in_a_layer():
    names = {p.stem if p.suffix == ".py" else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())) and p.stem != "__init__"}
    placed = {name for layer in LAYERS for name in layer}
    assert names - placed == set(), "modules missing from LAYERS (and docs/ARCHITECTURE.md)"


def test_nothing_imports_upward():
    g = graph()
    layers = [grimp.Layer(*names, independent=False) for names in LAYERS]
    illegal = g.find_illegal_dependencies_for_layers(layers=layers, containers={"kvmmap"})
    found = sorted(f"{d.importer} -> {d.imported} via {sorted(r.heads)} {r.middle} {sorted(r.tails)}"
                   for d in illegal for r in d.routes)
    assert found == []


def test_torch_and_transformers_only_in_the_top_layer():
    """integrations (and tools.convert, reading bfloat16 safetensors) may; nothing below."""
    g = graph()
    top = tuple(f"kvmmap.{name}" for name in LAYERS[0])
    bad = [m for m in sorted(g.modules) if m.startswith("kvmmap") and not m.startswith(top)
           and any(g.direct_import_exists(importer=m, imported=x) for x in ("torch", "transformers"))]
    assert bad == []


def test_no_module_reads_another_modules_private_names():
    """``alias._name`` where ``alias`` is a module imported from kvmmap (tests aside)."""
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("kvmmap")):
                aliases |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("kvmmap")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.value.id not in EXTENSIONS):
                offences.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert offences == []
