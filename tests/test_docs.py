"""Texts in src/ cite only documents in the repository, and the sections they cite exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src").rglob("*.py"))
CITATION = re.compile(r"docs/design\.md (§\d+(?:\.\d+)?(?:\s*(?:,|-|and)\s*§\d+(?:\.\d+)?)*)")


def _design_sections() -> set[str]:
    headings = re.findall(
        r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "docs/design.md").read_text(), re.M
    )
    return set(headings)


def test_no_source_text_cites_the_spec():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in SOURCES
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"\bSPEC\b|SPEC\.md", line)
    ]
    assert not offenders, "cite docs/design.md instead:\n" + "\n".join(offenders)


def test_cited_design_sections_exist():
    sections = _design_sections()
    assert {"1", "3", "4.2", "15", "17"} <= sections
    cited = 0
    for path in SOURCES:
        for match in CITATION.finditer(path.read_text()):
            for number in re.findall(r"§(\d+(?:\.\d+)?)", match.group(1)):
                cited += 1
                assert number in sections, f"{path.relative_to(ROOT)} cites missing §{number}"
    assert cited > 20


# --------------------------------------------------------------------------------------------
# README.md: a user's guide whose commands, links and Python example are checked

README = ROOT / "README.md"
# Written by `make paper` (the study's report generator), not committed: mentioned, not linked.
GENERATED_DOCS = {"docs/results.md"}
MAKE_COMMANDS = [
    "make demo   # sets up .venv, then runs the whole demo study (configs/tiny.yaml) on CPU",
    "make test   # sets up .venv, then runs ruff and the test suite",
]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.M | re.S)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_is_a_short_guide_starting_with_the_two_make_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 300, "README.md is a user's guide: move details to docs/"
    first = _blocks("bash")[0].splitlines()
    assert first == MAKE_COMMANDS
    assert text.index("```bash\n" + "\n".join(MAKE_COMMANDS)) < text.index("\n## ")
    # the comments say what the Makefile does
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/nexus-moe run configs/tiny.yaml" in makefile.split("demo: $(STAMP)")[1]
    test_recipe = makefile.split("test: $(STAMP)")[1].split("\n\n")[0]
    assert "ruff check" in test_recipe and "pytest" in test_recipe


def test_readme_links_and_doc_paths_exist():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) >= 5
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        assert (ROOT / path).is_file(), f"README links to missing {path}"
        if anchor:
            headings = re.findall(r"^#{1,6} (.+)$", (ROOT / path).read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{path} has no heading #{anchor}"
    for path in set(re.findall(r"\b((?:docs/[\w./-]+|[A-Z]+)\.(?:md|png))\b", text)):
        assert path in GENERATED_DOCS or (ROOT / path).is_file(), f"README names missing {path}"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (ROOT / image).stat().st_size < 100_000, f"{image}: keep documentation images small"


def _invocations(doc: Path) -> list[list[str]]:
    """Every `nexus-moe ...` (or `-m nexus_moe.cli ...`) invocation in a document's bash blocks
    and inline code, as the argv after the program name."""
    import shlex

    text = doc.read_text()
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`\n]*nexus(?:-moe |_moe\.cli )[^`]+)`", text)
    calls = []
    for line in lines:
        line = line.split("#")[0]
        match = re.search(r"(?:^|\s)(?:nexus-moe|-m nexus_moe\.cli) (.*)$", line.strip())
        if match:
            argv = shlex.split(re.sub(r"\[--[^\]]*\]", "", match.group(1)))  # [--optional]
            calls.append([arg for arg in argv if arg != "..."])
    return calls


@pytest.mark.parametrize("doc", ["README.md", "docs/scaling.md"])
def test_commands_and_options_shown_in_the_docs_exist(doc):
    """Each command a document shows is a real sub-command, and each option one it takes."""
    import typer

    from nexus_moe.cli import app

    root = typer.main.get_command(app)
    calls = _invocations(ROOT / doc)
    assert len(calls) >= 5
    for argv in calls:
        command, rest = root, list(argv)
        while hasattr(command, "commands") and rest and rest[0] in command.commands:
            command = command.commands[rest.pop(0)]
        if rest == ["--help"] or rest[:1] == ["<command>"]:  # `nexus-moe [<command>] --help`
            continue
        assert not hasattr(command, "commands"), f"{doc}: no command in {argv}"
        known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        used = {arg.split("=")[0] for arg in rest if arg.startswith("--")}
        assert used <= known, f"{doc}: nexus-moe {argv[0]} has no {sorted(used - known)}"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python block, run as written on a tiny stand-in for what `make demo` writes
    (runs/tiny: corpus, seed, FFN-only experts for code, legal and math, domain embeddings)."""
    from dataclasses import replace

    import torch

    from conftest import tiny_bpe_file, tiny_config
    from nexus_moe.corpus import build_corpus
    from nexus_moe.embed import DomainEmbeddings
    from nexus_moe.pipeline import branch_expert, pretrain_seed
    from nexus_moe.train import FFN_PARAMETERS, TrainConfig

    blocks = [b for b in _blocks("python") if "nexus_moe" in b]
    assert len(blocks) == 1, "README: one Python example of the nexus_moe API"
    texts = {
        "code": "def f{i}(x):\n    return x * {i} + len(str(x))\n",
        "legal": "The licensee shall not sublicense section {i} without written consent.",
        "math": "Let n = {i}; then n squared is divisible by {i} and by one.",
    }
    data = tmp_path / "data"
    for domain, template in texts.items():
        (data / domain).mkdir(parents=True)
        for i in range(30):
            body = " ".join(template.format(i=(i * 7 + j) % 97) for j in range(10))
            (data / domain / f"doc{i}.txt").write_text(body)
    run = tmp_path / "runs" / "tiny"
    corpus = run / "corpus"
    build_corpus(corpus, domains=list(texts), source_dir=data, val_fraction=0.1, seed=0)
    samples = [t.format(i=i) for t in texts.values() for i in range(40)]
    tok = tiny_bpe_file(tmp_path / "tok.json", samples, 300)
    train = TrainConfig(steps=20, batch_size=4, seq_len=32, lr=3e-3, eval_tokens=128)
    train = replace(train, checkpoint_every=0)
    seed = pretrain_seed(tiny_config(vocab_size=300), corpus, tok, list(texts), train, run / "seed")
    branch = replace(train, steps=5, train_only=list(FFN_PARAMETERS))
    for domain in texts:
        branch_expert(seed, corpus, domain, branch, run / "experts" / domain)
    vectors = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    DomainEmbeddings(list(texts), vectors, embedder="test", dim=8, num_chunks=4).save(
        run / "domain_embeddings"
    )

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102

    from nexus_moe.checkpoint import load_config

    cfg, _ = load_config(tmp_path / "runs" / "py" / "moe3")
    assert cfg.moe is not None and cfg.moe.num_experts == 3
    assert cfg.moe.domains == ["code", "legal", "math"]
    assert namespace["ids"].shape[1] > 0
