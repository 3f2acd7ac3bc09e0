"""Tiny random GPT-2 and Llama folders, written offline, to try `--model` with nothing downloaded.

    multihead tiny-model --out multihead-tiny          # writes multihead-tiny/gpt2 and multihead-tiny/llama
    multihead generate "The cat sat on the" --model multihead-tiny/gpt2
    multihead visualize "A dog ate the food because it was hungry" --model multihead-tiny/llama

    from multihead.tools.tiny_model import write_tiny_model
    write_tiny_model("tiny-gpt2", "gpt2")              # one folder, from Python

Each folder holds what a Hugging Face checkpoint holds: config.json,
generation_config.json and model.safetensors, written by transformers' own
`save_pretrained` (so the folder is in transformers' format, not in one
multihead invented, and loads in transformers too), and tokenizer.json with
tokenizer_config.json: a byte-level BPE, GPT-2's kind and Llama 3's, trained
here with the `tokenizers` library on CORPUS below. The weights are random:
the text a model writes is noise. What a folder shows is the whole path from a
folder on disk through multihead's loaders, its tokenizer, every attention
head and cached decoding.

Needs the `models` extra (tokenizers, safetensors) and transformers
(`pip install 'multihead[models,hf]'`). Imports only the standard library at
its top, as the CLI does.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

ARCHITECTURES = ("gpt2", "llama")
# Large enough that the corpus's common words become one token each and its rare ones stay pieces
# (`visualize` then shows both); the trainer stops earlier if the corpus runs out of pairs to merge.
VOCAB_SIZE = 600
MAX_POSITIONS = 256  # tokens a prompt plus its continuation may hold
# Random weights drawn wider than transformers' 0.02: with 0.02 every head spreads its weight almost
# evenly and the pictures of `visualize` are flat; at 0.2 the heads differ, as a trained model's do.
INIT_RANGE = 0.2
MARK = "Random weights, written by `multihead tiny-model`"  # the first line of the folder's README.md

# The text the tokenizer is trained on: the project's own sentences about attention, with the example
# sentences the CLI and the README use, so that their words are whole tokens and a few rare words are not.
CORPUS = """\
The artist painted the portrait of a woman with a brush.
All is well.
A dog ate the food because it was hungry.
The animal didn't cross the street because it was too tired.
The cat sat on the mat, and the dog sat on the rug.
Attention lets every token look at the other tokens of a text and take what it needs from them.
Each head has its own query, key and value projections, so each head asks its own question.
A query meets every key in a dot product; the larger the product, the better the key answers.
The scores are divided by the square root of the head size, then a softmax turns each row into weights.
The weights are positive and every row sums to one: a row says how much of each value a token takes.
A causal mask hides the tokens that come later, so a model that writes text cannot read ahead.
The heads run side by side; their outputs are joined and one more projection mixes them.
One head may follow the previous word, another the subject of the sentence, a third the end of it.
Reading the weights of every head shows what the model looks at when it reads a word.
A cache keeps the keys and values of the tokens already seen, so each new token costs one step.
Grouped-query attention lets several query heads share one key and value head and saves memory.
Rotary embeddings turn queries and keys by an angle that grows with the position of the token.
The model writes one token, reads it back, and writes the next, until it meets its end token.
A tokenizer cuts a text into pieces: common words stay whole and rare words fall into parts.
The painter washed the brush, the woman smiled, and the portrait dried in the afternoon light.
Hungry animals look for food; tired ones look for a place to rest by the side of the street.
"""


class TinyModel(NamedTuple):
    """One folder `write_tiny_model` wrote."""

    arch: str  # "gpt2" or "llama"
    path: Path  # the folder: config.json, model.safetensors, tokenizer.json, ...
    vocab_size: int  # tokens of its tokenizer (= config.json's vocab_size)
    eos_token_id: int  # the end token `multihead generate` stops at

    def describe(self) -> str:
        return f"{self.path}: a random {self.arch} with a byte-level BPE of {self.vocab_size} tokens"


def check_target(directory: str | Path) -> Path:
    """The folder to write into: missing, empty, or one this tool wrote before; anything else is a ValueError."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file; give a folder for the tiny model")
    if path.is_dir() and any(path.iterdir()):
        readme = path / "README.md"
        if not (readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith(MARK)):
            raise ValueError(f"{str(path)!r} already holds files that multihead tiny-model did not write; "
                             f"give another folder (it is made if missing)")
    return path


def _special_tokens(arch: str) -> tuple[str, str]:
    """(beginning, end) of text: GPT-2 uses one token for both, Llama 3 two."""
    return ("<|endoftext|>",) * 2 if arch == "gpt2" else ("<|begin_of_text|>", "<|end_of_text|>")


def train_tokenizer(arch: str, corpus: str = CORPUS, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `corpus`, set up as GPT-2's or Llama 3's.

    Byte-level: every string has tokens (its 256 byte symbols are in the
    vocabulary), so a prompt outside the corpus still encodes. The Llama one
    starts every text with its beginning-of-text token, as Llama 3's does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bos, eos = _special_tokens(arch)
    specials = list(dict.fromkeys([bos, eos]))  # GPT-2's single token once
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus.splitlines(), trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if arch == "gpt2":
        tokenizer.post_processor = byte_level
    else:
        begin = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                              special_tokens=[(bos, tokenizer.token_to_id(bos))])
        tokenizer.post_processor = processors.Sequence([byte_level, begin])
    return tokenizer


def _network(arch: str, vocab_size: int, bos: int, eos: int):
    """A randomly initialised transformers model of `arch`: 2 layers of 4 heads, width 64."""
    import transformers

    common = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, initializer_range=INIT_RANGE)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_positions=MAX_POSITIONS, n_embd=64, n_layer=2, n_head=4, **common)
        return transformers.GPT2LMHeadModel(config)
    # grouped-query attention (4 query heads share 2 key/value heads) and RoPE, as the Llamas of today
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=MAX_POSITIONS, **common)
    return transformers.LlamaForCausalLM(config)


def _import_requirements() -> None:
    """One line naming what to install, instead of a traceback, when a library this tool needs is missing."""
    for name, extra in (("tokenizers", "models"), ("safetensors", "models"), ("transformers", "hf")):
        try:
            __import__(name)
        except ImportError:
            raise ValueError(f"multihead tiny-model needs {name}, which is not installed: "
                             f"pip install 'multihead[{extra}]'") from None


def write_tiny_model(directory: str | Path, arch: str, *, seed: int = 0) -> TinyModel:
    """Write a tiny random `arch` ("gpt2" or "llama") Hugging Face folder into `directory`; the same seed
    gives the same weights. Refuses (ValueError) a folder that holds files it did not write."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    path = check_target(directory)
    _import_requirements()
    import torch
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_tokenizer(arch)
    bos, eos = (tokenizer.token_to_id(t) for t in _special_tokens(arch))
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        network = _network(arch, tokenizer.get_vocab_size(), bos, eos)
    path.mkdir(parents=True, exist_ok=True)
    (path / "README.md").write_text(f"{MARK} (seed {seed}): a {arch} of 2 layers x 4 heads, width 64, whose "
                                    f"text is noise. Rewrite it with `multihead tiny-model`.\n", encoding="utf-8")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=_special_tokens(arch)[0],
                                      eos_token=_special_tokens(arch)[1], model_max_length=MAX_POSITIONS)
    with _quiet_transformers():
        network.save_pretrained(path)  # config.json, generation_config.json, model.safetensors
        wrapped.save_pretrained(path)  # tokenizer.json, tokenizer_config.json: AutoTokenizer reads it as well
    return TinyModel(arch, path, tokenizer.get_vocab_size(), eos)


@contextmanager
def _quiet_transformers():
    """transformers' progress bars off while it writes (they would cut through the CLI's lines), then as before."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def write_tiny_models(out: str | Path, *, seed: int = 0) -> list[TinyModel]:
    """A GPT-2 in out/gpt2 and a Llama in out/llama; both folders are checked before either is written."""
    for arch in ARCHITECTURES:
        check_target(Path(out) / arch)
    return [write_tiny_model(Path(out) / arch, arch, seed=seed) for arch in ARCHITECTURES]

