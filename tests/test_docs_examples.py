"""Every ```python block in docs/ runs, on the CPU, in a few seconds.

The convention (docs/index.md states it to readers): a block may use ``model``, ``loader`` (a list
of ``(x, y)`` batches), ``test_loader``, ``loss_fn``, ``x``, ``y``, ``total_steps``, ``device``,
``evaluate(model)`` and ``ddp_model`` (here the plain model: without a process group the
distributed helpers are plain SAM) without defining them; everything else it imports or defines
itself.  A block that cannot run here (it needs a GPU, a process group, or starts a compile) is
preceded by a line ``<!-- no-run: why -->``.  Each block runs in a fresh namespace with a fresh
model.
"""

import pathlib
import re
import time

import pytest
import torch

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\s`]*)[^\n]*$")
NO_RUN = re.compile(r"^\s*<!--\s*no-run:.*-->\s*$")
SLOW_S = 30.0  # CPU seconds: a block over this is a mistake (a compile, a real training run)


def _pages():
    # docs/results links to benchmarks/results (result files, not pages with examples)
    return sorted(p for p in DOCS.rglob("*.md") if "results" not in p.relative_to(DOCS).parts)


def blocks():
    """(page, line, runnable, code) of every ```python block in docs/."""
    out = []
    for page in _pages():
        lines = page.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m or not m.group("lang"):
                i += 1
                continue
            indent, lang, start = m.group("indent"), m.group("lang"), i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if lang == "python":
                prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
                code = "\n".join(ln.removeprefix(indent) for ln in lines[start + 1 : j])
                out.append((page.relative_to(DOCS).as_posix(), start + 1, not NO_RUN.match(prev), code))
            i = j + 1
    return out


BLOCKS = blocks()
RUNNABLE = [b for b in BLOCKS if b[2]]


def _namespace():
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.rand(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(4)]
    x, y = loader[0]
    return {
        "__name__": "__docs__",
        "model": model,
        "ddp_model": model,
        "loader": loader,
        "test_loader": loader,
        "loss_fn": torch.nn.functional.cross_entropy,
        "x": x,
        "y": y,
        "total_steps": len(loader),
        "device": "cpu",
        "evaluate": lambda m: None,
    }


def test_the_docs_have_runnable_examples():
    # a parser that finds nothing would pass every test below
    assert len(RUNNABLE) >= 15, [(p, n) for p, n, _, _ in BLOCKS]
    pages = {p for p, _, _, _ in RUNNABLE}
    assert {"index.md", "getting-started.md", "semantics.md", "variants.md", "hessian.md"} <= pages


@pytest.mark.parametrize(
    "page,line,code", [(p, n, c) for p, n, _, c in RUNNABLE], ids=[f"{p}:{n}" for p, n, _, _ in RUNNABLE]
)
def test_docs_example_runs(page, line, code, tmp_path, monkeypatch):
    if ".plot(" in code:
        pytest.importorskip("matplotlib")
        monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)  # examples that save files write here
    monkeypatch.setenv("FASTSAM_NO_JIT", "1")  # an example must never start a compile
    monkeypatch.delenv("FASTSAM_BACKEND", raising=False)
    start = time.process_time()  # CPU time: other jobs on the machine do not count
    exec(compile(code, f"docs/{page}:{line}", "exec"), _namespace())
    elapsed = time.process_time() - start
    if ".plot(" in code:
        import matplotlib.pyplot as plt

        plt.close("all")
    assert elapsed < SLOW_S, f"docs/{page}:{line} took {elapsed:.1f} CPU s"
