"""Prefix tuning (Li & Liang, ACL 2021) for BERT-family encoders, written for transformers 5.

peft's ``PrefixTuningConfig`` feeds the prefixes through ``past_key_values``, which transformers 5's
encoder classifiers no longer accept ("Model does not support past key values which are required
for prefix tuning", checked with peft 0.21.2 / transformers 5.24). Here every self-attention layer
gets its own trainable key and value prefixes of ``num_tokens`` positions per head, prepended to the
keys and values the layer computes; queries stay the input's, so the output keeps the input's length
and the classifier reads the same positions as without prefixes. Every input row attends to every
prefix position (the padding mask is widened with "attend" columns).

Initialisation follows Li & Liang's advice to start prefixes from the activations of real words:
:func:`word_prefix_input` draws ``num_tokens`` whole-word tokens from the vocabulary (seeded) and
every layer's prefixes start as the keys and values the frozen model computes for them;
``init="random"`` draws normal(0, ``init_std``) instead. On MiniLM what decides whether prefix tuning
learns is the head, not the init: with the classification head frozen at its random init (the
authors' protocol for adapter methods) the logits barely move whichever init; with the head trained
at lr 1e-2 both learn (docs/prefix_baselines/REPORT.md).

Run it as ``method=prefix`` (``prefix.num_virtual_tokens``, ``prefix.init``, ``prefix.init_std``); the
prefixes are adapter parameters, saved and reloaded with the adapter like LoRA's.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class PrefixKeyValues(nn.Module):
    """Trainable key and value prefixes of one self-attention layer: [heads, num_tokens, head_dim] each."""

    def __init__(self, num_heads: int, head_dim: int, num_tokens: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.key = nn.Parameter(torch.randn(num_heads, num_tokens, head_dim) * init_std)
        self.value = nn.Parameter(torch.randn(num_heads, num_tokens, head_dim) * init_std)


def widen_mask(mask: Tensor | None, num_tokens: int) -> Tensor | None:
    """Prepend ``num_tokens`` "attend" key columns to a boolean or additive attention mask (None stays None)."""
    if mask is None:
        return None
    shape = (*mask.shape[:-1], num_tokens)
    attend = torch.ones(shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool else \
        torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([attend, mask], dim=-1)


def _prefixed_self_attention(
    self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None, *args: Any, **kwargs: Any
) -> tuple[Tensor, None]:
    """BERT/RoBERTa self-attention over [prefix; input] keys and values (replaces the module's forward)."""
    batch, length = hidden_states.shape[:2]
    shape = (batch, length, -1, self.attention_head_size)
    query = self.query(hidden_states).view(shape).transpose(1, 2)  # [b, h, L, d]
    key = self.key(hidden_states).view(shape).transpose(1, 2)
    value = self.value(hidden_states).view(shape).transpose(1, 2)
    prefix: PrefixKeyValues = self.prefix
    key = torch.cat([prefix.key.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix.value.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=widen_mask(attention_mask, prefix.num_tokens),
        dropout_p=self.dropout.p if self.training else 0.0, scale=self.scaling,
    )
    return out.transpose(1, 2).reshape(batch, length, -1), None


def word_prefix_input(tokenizer: Any, num_tokens: int, *, seed: int) -> tuple[Tensor, Tensor]:
    """A row of ``num_tokens`` whole-word vocabulary tokens drawn with ``seed``, wrapped in the special tokens.

    Whole words: alphabetic tokens of three or more letters that are not special tokens, after removing a
    byte-level BPE word-start marker (``Ġ``); WordPiece continuations (``##...``) are left out.

    Returns:
        (input_ids [1, length], positions of the drawn words in it [num_tokens]).

    Raises:
        ValueError: the vocabulary has fewer than ``num_tokens`` such words.
    """
    special = set(tokenizer.all_special_ids)
    words = sorted(
        index for token, index in tokenizer.get_vocab().items()
        if index not in special and len(word := token.lstrip("\u0120")) >= 3 and word.isalpha()
    )
    if len(words) < num_tokens:
        raise ValueError(f"the vocabulary has {len(words)} whole-word tokens, fewer than num_tokens={num_tokens}")
    generator = torch.Generator().manual_seed(seed)
    drawn = [words[i] for i in torch.randperm(len(words), generator=generator)[:num_tokens].tolist()]
    # The tokenizer's special tokens around an empty text ([CLS] [SEP], <s> </s>) go around the words.
    wrap = list(tokenizer("", add_special_tokens=True)["input_ids"])
    lead = wrap[:1] if wrap and wrap[0] in (tokenizer.cls_token_id, tokenizer.bos_token_id) else []
    full = lead + drawn + wrap[len(lead):]
    return torch.tensor([full]), torch.arange(len(lead), len(lead) + num_tokens)


def _word_key_values(
    model: nn.Module, modules: list[nn.Module], input_ids: Tensor, positions: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """Keys and values [heads, words, head_dim] that each of ``modules`` computes for the words of ``input_ids``."""
    captured: dict[int, dict[str, Tensor]] = {id(m): {} for m in modules}
    hooks = []
    for module in modules:
        for part in ("key", "value"):
            def keep(_layer: nn.Module, _inputs: Any, output: Tensor, module: nn.Module = module, part: str = part) -> None:
                captured[id(module)][part] = output.detach()
            hooks.append(getattr(module, part).register_forward_hook(keep))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=input_ids.to(modules[0].query.weight.device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    out = []
    for module in modules:
        pair = []
        for part in ("key", "value"):
            states = captured[id(module)][part][0, positions.to(captured[id(module)][part].device)]  # [words, hidden]
            pair.append(states.view(len(positions), -1, module.attention_head_size).transpose(0, 1).contiguous())
        out.append((pair[0], pair[1]))
    return out


def _is_encoder_self_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("query", "key", "value", "attention_head_size", "scaling", "dropout")) \
        and not getattr(module, "is_decoder", False) and type(module).__name__.endswith("SelfAttention")


def apply_prefix_tuning(
    model: nn.Module, *, num_tokens: int, init_std: float = 0.02, init_input: tuple[Tensor, Tensor] | None = None
) -> list[str]:
    """Give every encoder self-attention layer of ``model`` trainable key/value prefixes.

    Args:
        init_input: (input_ids, word positions) from :func:`word_prefix_input`: start every layer's prefixes
            from the keys and values the model computes at those positions. None: normal(0, ``init_std``).
            Meta-device models (memory planning) always take the random form; shapes are the same.

    Returns:
        The names of the patched attention modules.

    Raises:
        ValueError: no BERT-family self-attention layer in ``model``, or a layer already has prefixes.
    """
    layers = [(name, module) for name, module in model.named_modules() if _is_encoder_self_attention(module)]
    for name, module in layers:
        if hasattr(module, "prefix"):
            raise ValueError(f"{name} already has prefixes; apply prefix tuning once")
    words = None
    if init_input is not None and layers and not layers[0][1].query.weight.is_meta:
        input_ids, positions = init_input
        if len(positions) != num_tokens:
            raise ValueError(f"init_input holds {len(positions)} word positions, expected num_tokens={num_tokens}")
        words = _word_key_values(model, [module for _, module in layers], input_ids, positions)
    patched = []
    for index, (name, module) in enumerate(layers):
        heads = module.query.out_features // module.attention_head_size
        module.prefix = PrefixKeyValues(heads, module.attention_head_size, num_tokens, init_std=init_std).to(
            module.query.weight.device, module.query.weight.dtype
        )
        if words is not None:
            with torch.no_grad():
                module.prefix.key.copy_(words[index][0])
                module.prefix.value.copy_(words[index][1])
        module.forward = types.MethodType(_prefixed_self_attention, module)
        patched.append(name)
    if not patched:
        raise ValueError(
            f"{type(model).__name__} has no BERT-family encoder self-attention layer; prefix tuning here "
            "supports BERT and RoBERTa encoders"
        )
    logger.info("prefix tuning: %d virtual key/value positions in %d attention layers, %s init", num_tokens, len(patched),
                "real-word" if words is not None else "random")
    return patched
