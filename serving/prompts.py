"""`prompt_weighting`: weighted prompt syntax and prompts longer than CLIP's 77 tokens.

Syntax (the A1111 one most published prompts use, plus compel's `+`/`-` suffixes):

- `(text:1.3)`: weight 1.3; `(text)`: ×1.1; `[text]`: ÷1.1; groups nest and multiply.
- `word+`, `word++`, `(text)+`: ×1.1 per `+`; `word-`, `(text)--`: ×0.9 per `-` (a run of
  `+`/`-` counts only right after a word or group and before a space, punctuation or the end,
  so `well-lit` stays text). `(text)1.3` (compel's spelling) is weight 1.3.
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal brackets / backslash; unbalanced closing brackets are
  text, an unclosed group runs to the end of the prompt (as in A1111).

Long prompts are chunked as A1111 and compel do: the token stream is cut into chunks of 75
tokens, each chunk is framed by BOS/EOS and padded to 77, encoded on its own, and the chunk
embeddings are concatenated along the sequence, so the U-Net cross-attends to every token of a
long prompt. A weighted token's embedding becomes `empty + w * (z - empty)`, where `empty` is
the empty prompt's embedding at the same position (compel's formulation: w > 1 pushes away
from "nothing", w < 1 pulls towards it). The shorter of prompt / negative prompt is padded with
empty-prompt chunks. SDXL's pooled embedding is the second encoder's pooled output of the
first chunk (weights do not apply to it, as in A1111 and compel).

Everything else mirrors diffusers' own `encode_prompt` exactly (the hidden-state layer, the
final layer norm, `clip_skip` on the positive prompt only, SDXL's zeroed negative for an empty
negative prompt), so a plain short prompt gives the same embeddings with and without
`prompt_weighting`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

ROUND_UP = 1.1
SQUARE_DOWN = 1 / 1.1
PLUS_WEIGHT = 1.1
MINUS_WEIGHT = 0.9
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_COLON_WEIGHT = re.compile(r":\s*(" + _NUMBER + r")\s*\)")
_SUFFIX_BOUNDARY = r"(?=$|[\s,.;:!?)\]])"
_SIGN_SUFFIX = re.compile(r"(\++|-+)" + _SUFFIX_BOUNDARY)
_NUMBER_SUFFIX = re.compile(r"(\d+(?:\.\d*)?|\.\d+)" + _SUFFIX_BOUNDARY)
_TRAILING_WORD = re.compile(r"\w+$")


def parse_weighted_prompt(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) fragments in order; adjacent equal weights are merged."""
    parser = _Parser(text)
    parser.parse_until(None)
    merged: list[tuple[str, float]] = []
    for fragment, weight in parser.fragments:
        if not fragment:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + fragment, weight)
        else:
            merged.append((fragment, weight))
    return merged


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.fragments: list[list[Any]] = []  # [text, weight] relative to the enclosing groups

    def parse_until(self, closer: str | None) -> float | None:
        """Consume text up to `closer`; returns a `(...:w)` weight if the group ended with one."""
        buffer: list[str] = []
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char == "\\" and self.pos + 1 < len(text):
                buffer.append(text[self.pos + 1])
                self.pos += 2
            elif char in "([":
                self._flush(buffer)
                self._group(char)
            elif closer == ")" and char == ":" and (match := _COLON_WEIGHT.match(text, self.pos)):
                self._flush(buffer)
                self.pos = match.end()
                return float(match.group(1))
            elif char == closer:
                self._flush(buffer)
                self.pos += 1
                return None
            elif (
                char in "+-"
                and (word := _TRAILING_WORD.search("".join(buffer)))
                and (suffix := _SIGN_SUFFIX.match(text, self.pos))
            ):
                head = "".join(buffer)[: word.start()]
                buffer.clear()
                self._flush([head])
                self.fragments.append([word.group(0), _sign_weight(suffix.group(1))])
                self.pos = suffix.end()
            else:
                buffer.append(char)
                self.pos += 1
        self._flush(buffer)
        return None

    def _group(self, opener: str) -> None:
        self.pos += 1
        first = len(self.fragments)
        colon_weight = self.parse_until(")" if opener == "(" else "]")
        weight = colon_weight if colon_weight is not None else (ROUND_UP if opener == "(" else SQUARE_DOWN)
        if sign := _SIGN_SUFFIX.match(self.text, self.pos):
            weight = (1.0 if colon_weight is None else colon_weight) * _sign_weight(sign.group(1))
            self.pos = sign.end()
        elif colon_weight is None and opener == "(" and (number := _NUMBER_SUFFIX.match(self.text, self.pos)):
            weight = float(number.group(1))
            self.pos = number.end()
        for fragment in self.fragments[first:]:
            fragment[1] *= weight

    def _flush(self, buffer: list[str]) -> None:
        if buffer:
            self.fragments.append(["".join(buffer), 1.0])
            buffer.clear()


def _sign_weight(signs: str) -> float:
    return (PLUS_WEIGHT if signs[0] == "+" else MINUS_WEIGHT) ** len(signs)


@dataclass
class PromptEmbeddings:
    """Keyword arguments for the pipeline call in place of prompt / negative_prompt."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        kwargs = {"prompt_embeds": self.prompt_embeds, "negative_prompt_embeds": self.negative_prompt_embeds}
        if self.pooled_prompt_embeds is not None and self.negative_pooled_prompt_embeds is not None:
            kwargs["pooled_prompt_embeds"] = self.pooled_prompt_embeds
            kwargs["negative_pooled_prompt_embeds"] = self.negative_pooled_prompt_embeds
        return kwargs


@torch.no_grad()
def encode_prompts(
    pipe: Any, prompt: str, negative_prompt: str, *, weighting: bool, clip_skip: int | None
) -> PromptEmbeddings:
    """Embeddings of prompt and negative prompt for an SD 1.x/2.x or SDXL pipeline.

    With `weighting`, the weight syntax is parsed and long prompts are chunked; without it the
    text is taken literally and cut at 75 tokens, exactly as the pipeline's own encoder does
    (used for `clip_skip`, whose diffusers 0.42 code path fails on transformers 5's CLIPTextModel).
    """
    is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if is_sdxl:
        return _encode_sdxl(pipe, prompt, negative_prompt, clip_skip, weighting)
    encoders = [_Encoder(pipe, pipe.tokenizer, pipe.text_encoder, sdxl=False, weighting=weighting)]
    positive = [encoders[0].encode(prompt, clip_skip)]
    negative = [encoders[0].encode(negative_prompt, None)]
    prompt_embeds, negative_embeds = _pad_to_same_length(positive, negative, encoders)
    dtype = pipe.text_encoder.dtype
    return PromptEmbeddings(prompt_embeds.to(dtype), negative_embeds.to(dtype))


def _encode_sdxl(
    pipe: Any, prompt: str, negative_prompt: str, clip_skip: int | None, weighting: bool
) -> PromptEmbeddings:
    encoders = [
        _Encoder(pipe, tokenizer, text_encoder, sdxl=True, weighting=weighting)
        for tokenizer, text_encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
        if text_encoder is not None
    ]
    positive = [encoder.encode(prompt, clip_skip) for encoder in encoders]
    pooled = _pooled(encoders[-1])
    zero_negative = not negative_prompt and pipe.config.force_zeros_for_empty_prompt
    if zero_negative:
        prompt_embeds, _ = _pad_to_same_length(positive, positive, encoders)
        negative_embeds = torch.zeros_like(prompt_embeds)
        negative_pooled = torch.zeros_like(pooled)
    else:
        negative = [encoder.encode(negative_prompt, None) for encoder in encoders]
        negative_pooled = _pooled(encoders[-1])
        prompt_embeds, negative_embeds = _pad_to_same_length(positive, negative, encoders)
    dtype = pipe.text_encoder_2.dtype
    return PromptEmbeddings(
        prompt_embeds.to(dtype), negative_embeds.to(dtype), pooled.to(dtype), negative_pooled.to(dtype)
    )


def _pooled(encoder: _Encoder) -> torch.Tensor:
    if encoder.last_pooled is None:
        raise ValueError("SDXL's last text encoder gave no pooled output; is it a CLIPTextModelWithProjection?")
    return encoder.last_pooled


def _pad_to_same_length(
    positive: list[list[torch.Tensor]], negative: list[list[torch.Tensor]], encoders: list[_Encoder]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per encoder, both sides get as many chunks as the longest; missing ones are the empty prompt."""
    count = max(len(chunks) for chunks in [*positive, *negative])

    def joined(per_encoder: list[list[torch.Tensor]]) -> torch.Tensor:
        columns = []
        for encoder, chunks in zip(encoders, per_encoder):
            padding = [encoder.empty_chunk()] * (count - len(chunks))
            columns.append(torch.cat([*chunks, *padding], dim=1))
        return torch.cat(columns, dim=-1)

    return joined(positive), joined(negative)


class _Encoder:
    """One tokenizer + text encoder pair; SDXL takes hidden states before the final layer norm."""

    def __init__(self, pipe: Any, tokenizer: Any, text_encoder: Any, *, sdxl: bool, weighting: bool) -> None:
        self.pipe = pipe
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.sdxl = sdxl
        self.weighting = weighting
        self.chunk_tokens = tokenizer.model_max_length - 2
        self.last_pooled: torch.Tensor | None = None
        self._empty: torch.Tensor | None = None

    def encode(self, prompt: str, clip_skip: int | None) -> list[torch.Tensor]:
        """One (1, 77, dim) tensor per chunk of 75 tokens; sets `last_pooled` from the first chunk."""
        ids, weights = self._tokens(prompt)
        chunks = [
            (ids[start : start + self.chunk_tokens], weights[start : start + self.chunk_tokens])
            for start in range(0, max(len(ids), 1), self.chunk_tokens)
        ]
        embeddings = []
        for index, (chunk_ids, chunk_weights) in enumerate(chunks):
            hidden, pooled = self._encode_chunk(chunk_ids, clip_skip)
            if index == 0:
                self.last_pooled = pooled
            weights = [1.0, *chunk_weights, 1.0]
            if any(weight != 1.0 for weight in weights):
                hidden = _apply_weights(hidden, self._encode_chunk([], clip_skip)[0], weights)
            embeddings.append(hidden)
        return embeddings

    def empty_chunk(self) -> torch.Tensor:
        if self._empty is None:
            self._empty = self._encode_chunk([], None)[0]
        return self._empty

    def _tokens(self, prompt: str) -> tuple[list[int], list[float]]:
        ids: list[int] = []
        weights: list[float] = []
        fragments = parse_weighted_prompt(prompt) if self.weighting else [(prompt, 1.0)]
        for text, weight in fragments:
            if hasattr(self.pipe, "maybe_convert_prompt"):  # textual-inversion multi-vector tokens
                text = self.pipe.maybe_convert_prompt(text, self.tokenizer)
            fragment_ids = self.tokenizer(text, add_special_tokens=False, truncation=False).input_ids
            ids.extend(fragment_ids)
            weights.extend([weight] * len(fragment_ids))
        if not self.weighting:  # the pipeline's own encoder truncates to one chunk
            del ids[self.chunk_tokens :], weights[self.chunk_tokens :]
        return ids, weights

    def _encode_chunk(self, chunk_ids: list[int], clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = [tokenizer.bos_token_id, *chunk_ids, tokenizer.eos_token_id]
        ids += [pad] * (tokenizer.model_max_length - len(ids))
        input_ids = torch.tensor([ids], device=self.text_encoder.device)
        if self.sdxl:
            output = self.text_encoder(input_ids, output_hidden_states=True)
            pooled = output[0] if output[0].ndim == 2 else None
            layer = -2 if clip_skip is None else -(clip_skip + 2)
            return output.hidden_states[layer], pooled
        if clip_skip is None:
            return self.text_encoder(input_ids)[0], None
        output = self.text_encoder(input_ids, output_hidden_states=True)
        # transformers 5's CLIPTextModel holds final_layer_norm itself; 4.x kept it in .text_model
        final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_layer_norm(output.hidden_states[-(clip_skip + 1)]), None


def _apply_weights(hidden: torch.Tensor, empty: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Move each token's embedding away from (w > 1) or towards (w < 1) the empty prompt's.

    compel's formulation, `empty + w * (hidden - empty)`, position by position. A1111 instead
    multiplies by w and rescales the chunk to its old mean, which divides by a mean that can be
    ~0 (final-layer-norm outputs) and then blows up.
    """
    scale = torch.tensor(weights, dtype=hidden.dtype, device=hidden.device)
    scale = torch.nn.functional.pad(scale, (0, hidden.shape[1] - len(weights)), value=1.0)[None, :, None]
    return torch.where(scale == 1.0, hidden, empty + scale * (hidden - empty))
