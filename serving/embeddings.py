"""`embeddings`: textual-inversion vectors mapped to prompt tokens for one request.

Files are safetensors only, in the layouts published embeddings use:

- SD 1.x: one tensor of shape (vectors, 768) (or one vector), named `emb_params` (A1111 /
  kohya) or after its token (diffusers);
- SDXL: `clip_l` (vectors, 768) and `clip_g` (vectors, 1280), one per text encoder.

The request's `tokens` name the vectors: with as many tokens as vectors, token i stands for
vector i (fal's pivotal-tuning convention: `<s0>` `<s1>` for two vectors); with one token, it
stands for all of them (diffusers expands `<tok>` to `<tok> <tok>_1 …` in prompts, which is how
A1111 embeddings are used). Any other count is refused rather than guessed.

Embeddings are added to the resident tokenizers and text encoders for the duration of a request
and removed afterwards (`unload`), so the next request sees the plain vocabulary: a token left
behind would change how every later prompt containing that string is tokenised, on requests that
never named the embedding, and would make a later request that binds the same token to another
file fail as "already in the vocabulary". Adding them is cheap next to a denoising run; reading
the file is what is worth keeping, so the caller passes `read`, which takes the tensors from the
replica's host-RAM tier (serving/lora_cache.py) where it has one. Everything is checked before
the first token is added, so a bad file leaves the pipeline untouched. Errors are
`EmbeddingLoadError`; serving.pipelines turns them into `AdapterLoadError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# An embedding file's tensors by name; raises EmbeddingLoadError naming the file if it can't be read.
ReadEmbedding = Callable[[Path], Mapping[str, torch.Tensor]]
SDXL_KEYS = ("clip_l", "clip_g")


class EmbeddingLoadError(Exception):
    """An embedding could not be read or does not fit the model; the message names the file and why."""


@dataclass
class LoadedEmbeddings:
    """Tokens added to each (tokenizer, text encoder) pair, so exactly those can be removed again."""

    added: list[tuple[Any, Any, list[str]]] = field(default_factory=list)


def load(
    pipe: Any, embeddings: Sequence[tuple[str, Sequence[str]]], *, model_label: str, read: ReadEmbedding
) -> LoadedEmbeddings:
    """Add every embedding's tokens to the pipeline; on any error nothing stays added."""
    loaded = LoadedEmbeddings()
    if not embeddings:
        return loaded
    encoders = _encoders(pipe)
    plans = [_plan(Path(path), list(tokens), encoders, model_label, read) for path, tokens in embeddings]
    _check_unique(plans)
    try:
        for plan in plans:
            for (tokenizer, text_encoder), vectors in zip(encoders, plan.vectors):
                before = set(tokenizer.get_added_vocab())
                pipe.load_textual_inversion(
                    _split(vectors, plan.tokens),
                    token=_token_arg(plan.tokens),
                    tokenizer=tokenizer,
                    text_encoder=text_encoder,
                )
                added = sorted(set(tokenizer.get_added_vocab()) - before)
                loaded.added.append((tokenizer, text_encoder, added))
    except Exception as exc:
        unload(pipe, loaded)
        raise EmbeddingLoadError(f"embedding could not be loaded into model {model_label!r}: {exc}") from exc
    return loaded


def unload(pipe: Any, loaded: LoadedEmbeddings) -> None:
    """Remove what `load` added, from every tokenizer / text encoder, newest first."""
    while loaded.added:
        tokenizer, text_encoder, tokens = loaded.added.pop()
        if tokens:
            pipe.unload_textual_inversion(tokens=tokens, tokenizer=tokenizer, text_encoder=text_encoder)


@dataclass(frozen=True)
class _Plan:
    path: Path
    tokens: list[str]
    # One (vectors, dim) tensor per text encoder, in the pipeline's encoder order.
    vectors: list[torch.Tensor]


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def _plan(
    path: Path, tokens: list[str], encoders: list[tuple[Any, Any]], model_label: str, read: ReadEmbedding
) -> _Plan:
    """Read and check one embedding against the model without changing anything."""
    name = path.name
    tensors = read(path)
    sdxl = len(encoders) == 2
    if set(SDXL_KEYS) <= set(tensors):
        if not sdxl:
            raise EmbeddingLoadError(
                f"embedding {name!r} is an SDXL embedding (clip_l / clip_g); model {model_label!r} is SD 1.x"
            )
        raw = [tensors["clip_l"], tensors["clip_g"]]
    elif len(tensors) == 1:
        if sdxl:
            raise EmbeddingLoadError(
                f"embedding {name!r} has one tensor (an SD 1.x embedding); an SDXL model needs `clip_l` and `clip_g`"
            )
        raw = list(tensors.values())
    else:
        raise EmbeddingLoadError(
            f"embedding {name!r}: expected one tensor (`emb_params` or a token name) or SDXL's `clip_l` and "
            f"`clip_g`, found {', '.join(sorted(tensors)[:5])}"
        )
    vectors = [_as_vectors(tensor, name) for tensor in raw]
    if len({v.shape[0] for v in vectors}) != 1:
        raise EmbeddingLoadError(f"embedding {name!r}: clip_l and clip_g have different numbers of vectors")
    count = vectors[0].shape[0]
    if len(tokens) not in (1, count):
        raise EmbeddingLoadError(
            f"embedding {name!r} has {count} vector(s) but {len(tokens)} tokens were given ({', '.join(tokens)}); "
            "give one token per vector, or one token for all of them"
        )
    for (tokenizer, text_encoder), vector, encoder_name in zip(encoders, vectors, ("text_encoder", "text_encoder_2")):
        expected = text_encoder.get_input_embeddings().weight.shape[-1]
        if vector.shape[-1] != expected:
            raise EmbeddingLoadError(
                f"embedding {name!r} has vectors of size {vector.shape[-1]} but {encoder_name} of model "
                f"{model_label!r} takes {expected} — an embedding for another model family?"
            )
        vocab = tokenizer.get_vocab()
        taken = [token for token in _expanded(tokens, count) if token in vocab]
        if taken:
            raise EmbeddingLoadError(
                f"embedding {name!r}: token(s) {', '.join(taken)} already exist in the model's vocabulary; "
                "pick tokens that are not words (e.g. <s0>)"
            )
    return _Plan(path=path, tokens=tokens, vectors=vectors)


def _as_vectors(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] == 0 or not tensor.is_floating_point():
        raise EmbeddingLoadError(
            f"embedding {name!r}: expected float vectors of shape (count, size), got {tuple(tensor.shape)} {tensor.dtype}"
        )
    return tensor.float()


def _expanded(tokens: list[str], count: int) -> list[str]:
    """The tokens that will be added: one per vector, or diffusers' `<tok>_1 …` for one token."""
    if len(tokens) == 1 and count > 1:
        return [tokens[0]] + [f"{tokens[0]}_{i}" for i in range(1, count)]
    return list(tokens)


def _check_unique(plans: list[_Plan]) -> None:
    seen: dict[str, Path] = {}
    for plan in plans:
        for token in _expanded(plan.tokens, plan.vectors[0].shape[0]):
            if token in seen:
                raise EmbeddingLoadError(
                    f"token {token!r} is used by embeddings {seen[token].name!r} and {plan.path.name!r}"
                )
            seen[token] = plan.path


def _split(vectors: torch.Tensor, tokens: list[str]) -> torch.Tensor | list[torch.Tensor]:
    """diffusers' call shape: one tensor for one token, a list of single vectors for one token each."""
    return vectors if len(tokens) == 1 else list(vectors)


def _token_arg(tokens: list[str]) -> str | list[str]:
    return tokens[0] if len(tokens) == 1 else tokens
