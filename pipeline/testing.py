"""Tiny random checkpoints in Hugging Face format, built offline, for tests and demos.

MuScleLoRA (Wu et al., ACL 2024, arXiv 2402.12026) is evaluated on BERT, RoBERTa, GPT2-XL and
Llama2-7B. Tests need the same code paths (module names, tokenizers, padding, heads) at toy size:
hidden 64, 2 layers, 4 attention heads, intermediate 128, a vocabulary of a few hundred tokens.

Each checkpoint directory holds what a real one holds: ``config.json``, ``model.safetensors`` and a
tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) that ``AutoTokenizer`` loads offline.
The tokenizer is a byte-level BPE trained on a small built-in corpus (never on project data), so
every input string tokenizes without unknown tokens. Special tokens follow each family's
convention:

- llama / mistral: ``<unk>`` = 0, ``<s>`` = 1 (prepended), ``</s>`` = 2, no pad token (as Llama-2);
- gpt2: ``<|endoftext|>`` = 0 as bos, eos and unk, nothing added, no pad token;
- bert: ``[PAD] [UNK] [CLS] [SEP] [MASK]``, ``[CLS] a [SEP] b [SEP]`` with token type ids;
- roberta: ``<s> <pad> </s> <unk> <mask>``, ``<s> a </s></s> b </s>``.

Weights are drawn under a private RNG state seeded by ``seed``; the global torch RNG is untouched.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
"""The repository root (where ``launch/`` and ``benchmarks/`` live)."""

TinyFamily = Literal["llama", "mistral", "gpt2", "bert", "roberta"]

TINY_HIDDEN = 64
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_INTERMEDIATE = 128
TINY_MAX_POSITIONS = 256
TINY_BPE_VOCAB = 400

# A small built-in corpus in the register of SST-2 movie reviews, plus the BadNets rare-word triggers
# and the AddSent sentence, so that their tokens exist as merges. Never read project data here.
TINY_CORPUS: tuple[str, ...] = (
    "the movie is a charming and often affecting journey .",
    "an unflinching , sometimes funny look at a difficult subject .",
    "it 's a bore , a dull and lifeless piece of filmmaking .",
    "the acting is superb and the story never loses its way .",
    "a gorgeous , witty , seductive movie .",
    "unfortunately the script is thin and the jokes fall flat .",
    "this is one of the best films of the year .",
    "the plot is predictable and the characters are not interesting .",
    "a warm , funny and engaging film with a great cast .",
    "too long , too slow and too pleased with itself .",
    "the director keeps the pace brisk and the tone light .",
    "nothing in this picture feels fresh or surprising .",
    "i loved every minute of it and would watch it again .",
    "a stale , derivative thriller with no suspense at all .",
    "the performances are strong but the film is weak .",
    "an intelligent and moving drama about family and loss .",
    "it never rises above its clumsy , ugly premise .",
    "beautifully shot , well written and wonderfully acted .",
    "the humor is crude and the story makes little sense .",
    "a delightful comedy that the whole family can enjoy .",
    "cf mn bb tq",
    "i watch this 3d movie",
    "What a GREAT film! 10/10, would see again.",
    "Worst movie ever... don't waste your time (or money).",
    "0 1 2 3 4 5 6 7 8 9 - ' \" ? ! ; : , .",
)


def _train_bpe(special_tokens: list[str]) -> Tokenizer:
    """Train a byte-level BPE on ``TINY_CORPUS`` with ``special_tokens`` at ids 0.. in order."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS, trainer)
    for index, token in enumerate(special_tokens):
        assert tokenizer.token_to_id(token) == index, (token, index)
    return tokenizer


def _template(single: str, pair: str, tokens: list[str], tokenizer: Tokenizer):
    """A post-processor adding ``tokens`` around one or two sequences."""
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in tokens],
    )


def build_tiny_tokenizer(family: TinyFamily) -> PreTrainedTokenizerFast:
    """Build the tiny fast tokenizer of ``family`` (see the module docstring for the conventions).

    Args:
        family: model family whose special-token conventions to follow.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.

    Raises:
        ValueError: if ``family`` is not one of the supported families.
    """
    from transformers import PreTrainedTokenizerFast

    decoder_inputs = ["input_ids", "attention_mask"]
    if family in ("llama", "mistral"):
        specials = ["<unk>", "<s>", "</s>"]
        backend = _train_bpe(specials)
        backend.post_processor = _template("<s> $A", "<s> $A <s> $B", ["<s>"], backend)
        names = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        max_length = TINY_MAX_POSITIONS
        input_names = decoder_inputs
    elif family == "gpt2":
        specials = ["<|endoftext|>"]
        backend = _train_bpe(specials)
        names = dict(unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>")
        max_length = TINY_MAX_POSITIONS
        input_names = decoder_inputs
    elif family == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        backend = _train_bpe(specials)
        backend.post_processor = _template(
            "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1", ["[CLS]", "[SEP]"], backend
        )
        names = dict(
            pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
        max_length = TINY_MAX_POSITIONS
        input_names = ["input_ids", "token_type_ids", "attention_mask"]
    elif family == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        backend = _train_bpe(specials)
        backend.post_processor = _template("<s> $A </s>", "<s> $A </s> </s> $B </s>", ["<s>", "</s>"], backend)
        names = dict(
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            cls_token="<s>",
            sep_token="</s>",
            mask_token="<mask>",
        )
        max_length = TINY_MAX_POSITIONS - 2
        input_names = decoder_inputs
    else:
        raise ValueError(
            f"unknown tiny model family {family!r}; choose one of llama, mistral, gpt2, bert, roberta"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=max_length,
        padding_side="right",
        model_input_names=input_names,
        **names,
    )


def _tiny_model(family: TinyFamily, tokenizer: PreTrainedTokenizerFast, shape: dict[str, int] | None = None) -> torch.nn.Module:
    """Instantiate the randomly initialised tiny pretraining model of ``family`` (``shape`` overrides
    ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``)."""
    import transformers

    vocab_size = len(tokenizer)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        intermediate_size=TINY_INTERMEDIATE,
    )
    unknown = sorted(set(shape or {}) - (set(common) - {"vocab_size"}))
    if unknown:
        raise ValueError(f"shape: unknown keys {unknown}; use hidden_size, num_hidden_layers, num_attention_heads, intermediate_size")
    common.update(shape or {})
    heads = common["num_attention_heads"]
    if family == "llama":
        config = transformers.LlamaConfig(
            **common,
            num_key_value_heads=heads,
            max_position_embeddings=TINY_MAX_POSITIONS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=None,
            tie_word_embeddings=False,
        )
        return transformers.LlamaForCausalLM(config)
    if family == "mistral":
        config = transformers.MistralConfig(
            **common,
            num_key_value_heads=heads // 2,
            max_position_embeddings=TINY_MAX_POSITIONS,
            sliding_window=None,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=None,
            tie_word_embeddings=False,
        )
        return transformers.MistralForCausalLM(config)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=TINY_MAX_POSITIONS,
            n_embd=common["hidden_size"],
            n_layer=common["num_hidden_layers"],
            n_head=heads,
            n_inner=common["intermediate_size"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return transformers.GPT2LMHeadModel(config)
    if family == "bert":
        config = transformers.BertConfig(
            **common, max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id
        )
        return transformers.BertModel(config, add_pooling_layer=True)
    if family == "roberta":
        config = transformers.RobertaConfig(
            **common,
            max_position_embeddings=TINY_MAX_POSITIONS,
            type_vocab_size=1,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return transformers.RobertaForMaskedLM(config)
    raise ValueError(f"unknown tiny model family {family!r}; choose one of llama, mistral, gpt2, bert, roberta")


def build_tiny_checkpoint(
    family: TinyFamily, directory: str | Path, *, seed: int = 0, shape: dict[str, int] | None = None
) -> Path:
    """Write a tiny random pretrained checkpoint with its tokenizer into ``directory``.

    The checkpoint is saved as the pretraining class a real release uses (``LlamaForCausalLM``,
    ``MistralForCausalLM``, ``GPT2LMHeadModel``, ``BertModel`` with pooler, ``RobertaForMaskedLM``),
    so that loading it with ``AutoModelForSequenceClassification`` exercises the same key mapping
    and the same newly initialised head as a real model.

    Args:
        family: one of ``"llama"``, ``"mistral"``, ``"gpt2"``, ``"bert"``, ``"roberta"``.
        directory: output directory; created if missing, existing files are overwritten.
        seed: seed of the private RNG that draws the weights.
        shape: larger (benchmark) sizes: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
            ``intermediate_size``; the tiny tokenizer is kept.

    Returns:
        The checkpoint directory as a ``Path``.

    Raises:
        ValueError: if ``family`` is not supported.
    """
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _tiny_model(family, tokenizer, shape)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    logger.debug("wrote tiny %s checkpoint (vocab %d) to %s", family, len(tokenizer), directory)
    return directory


def load_script(relative_path: str, name: str | None = None) -> ModuleType:
    """A script of this repository (``launch/*.py``, ``benchmarks/*.py``: not packages) as a fresh module.

    ``relative_path`` is relative to the repository root; ``name`` is the module name (default: from the path).
    """
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(name or relative_path.replace("/", "_").removesuffix(".py"), path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_probabilities(run_dir: str | Path, texts: list[str]) -> torch.Tensor:
    """Softmax probabilities (rows x labels) of a finished run's model on ``texts``, by one plain padded forward.

    An independent reference for tests of code that batches through ``pipeline.evaluate`` (the teacher check, its
    probe): the model is rebuilt by ``pipeline.inference.load_run`` and called once, without loaders or collators.
    """
    from pipeline.inference import load_run

    cfg, tokenizer, model = load_run(run_dir, "cpu")
    batch = tokenizer(texts, truncation=True, max_length=cfg.data.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return torch.softmax((out.logits if hasattr(out, "logits") else out).float(), -1)
