"""`multihead tiny-model`: the README's recipe for a model folder to try offline, run as written.

The folders are written once (the README's first command, in this process) and then read three ways:
by multihead's loaders against transformers reading the same folder, by the README's `generate` and
`visualize` commands, and by the refusal of a folder of someone else's files."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from multihead.tools.cli import main

transformers = pytest.importorskip("transformers", reason="tiny-model writes its folders through transformers")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]


def readme_recipe() -> list[list[str]]:
    """The commands of the README's tiny-model block, as argv lists without the leading `multihead`."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```\n(multihead tiny-model .*?)```", text, re.S)
    assert block, "the README has no block that starts with `multihead tiny-model`"
    commands = [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]
    assert all(c[0] == "multihead" for c in commands) and len(commands) == 3, commands
    return [c[1:] for c in commands]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The README's commands and the folder they run in, after its first one (tiny-model) ran there."""
    cwd = tmp_path_factory.mktemp("recipe")
    commands = readme_recipe()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        assert main(commands[0]) == 0
    return cwd, commands


def folder(recipe, arch: str) -> Path:
    cwd, commands = recipe
    out = commands[0][commands[0].index("--out") + 1]
    return cwd / out / arch


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_folder_loads_through_multihead_as_transformers_reads_it(recipe, arch):
    """multihead's loader and tokenizer give what transformers gives on the same folder: the folder is a
    Hugging Face checkpoint, not a format of multihead's own."""
    from multihead.models import load

    path = folder(recipe, arch)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in path.iterdir()}
    ours = load(path)
    assert ours.kind == arch and ours.num_layers == 2 and ours.num_heads == 4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    text = "The cat sat on the mattress, naïve café ✓"  # beyond the corpus: byte-level still encodes it
    batch = ours.tokenize([text])
    ids = batch.input_ids[0].tolist()
    assert ids == hf_tokenizer(text).input_ids
    assert ours.tokenizer.tokenizer.decode(ids) == text  # every byte comes back
    assert batch.tokens[0][1 if arch == "llama" else 0] == "The" and " cat" in batch.tokens[0]  # merged words
    assert batch.special[0][0] == (arch == "llama")  # Llama's tokenizer starts each text with <|begin_of_text|>
    # the end token `generate` stops at, as config.json, generation_config.json and the tokenizer name it
    end = {"gpt2": "<|endoftext|>", "llama": "<|end_of_text|>"}[arch]
    assert hf_model.config.eos_token_id == hf_model.generation_config.eos_token_id == hf_tokenizer.eos_token_id
    assert ours.tokenizer.tokenizer.id_to_token(hf_model.config.eos_token_id) == end
    with torch.no_grad():
        expected = hf_model(batch.input_ids).logits
        got = ours.network(batch.input_ids).logits
    assert got.shape == expected.shape and (got - expected).abs().max().item() < 1e-4


def test_the_readme_generate_and_visualize_run_on_it(recipe, capsys, monkeypatch):
    cwd, commands = recipe
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    capsys.readouterr()
    generate, visualize = commands[1], commands[2]
    assert generate[0] == "generate" and visualize[0] == "visualize"
    assert main(generate) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(generate[1]) and len(captured.out) > len(generate[1]) + 1
    assert main(visualize) == 0
    out = capsys.readouterr().out
    assert "llama, 2 layers x 4 heads, width 64" in out and "Where each head looks from 'hungry'" in out
    assert (cwd / "multihead-visualize" / "heads.html").is_file()


def test_it_refuses_a_folder_of_other_files_and_rewrites_its_own(recipe, tmp_path, capsys):
    from multihead.tools.tiny_model import check_target

    theirs = tmp_path / "models"
    (theirs / "llama").mkdir(parents=True)
    (theirs / "llama" / "notes.txt").write_text("mine")
    assert main(["tiny-model", "--out", str(theirs)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"multihead tiny-model: error: {str(theirs / 'llama')!r} already holds files "
                                         f"that multihead tiny-model did not write; give another folder (it is made "
                                         f"if missing)"]
    assert sorted(p.name for p in theirs.rglob("*")) == ["llama", "notes.txt"]  # nothing written, not even gpt2/
    assert check_target(folder(recipe, "llama")) == folder(recipe, "llama")  # its own: rewritten on request
