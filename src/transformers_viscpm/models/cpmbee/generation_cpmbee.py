# Copyright 2025 The transformers-viscpm developers. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""CPM-Bee generation: the original VisCPM beam search, token for token, on a transformers `Cache`.

Two pieces:

- [`CpmBeeExtTableLogitsProcessor`]: the per-sample rule of the original decoder. `<unk>` may only be generated
  when the sample's ext table maps it (`allow_unk`), and an ext id `vocab_size + k` only when entry `k` of the
  batch ext table belongs to the sample (`ext_table_mask`). It works in any transformers decoding loop;
  `CpmBeeForCausalLM._get_logits_processor` puts it first for every `generate` call whose kwargs carry both
  tensors (see `from_model_kwargs`). Stock beam search applies processors after `log_softmax`, where the mask
  has the same effect.
- [`cpmbee_beam_search`] / [`generate_answers`]: the original `VLLMCPMBeeBeamSearch._decode`. Stock beam search
  cannot reproduce it: the original applies the masks, the repetition penalty and the temperature to the *raw*
  logits before `log_softmax`, keeps `2 * num_beams` candidates whose EOS either finishes the hypothesis (last
  answer) or opens the next `<ans>` segment, and scores finished hypotheses by `sum_logprobs / len ** length_penalty`
  where `len` counts the generated `(token, answer)` pairs including the final one. Settings come from a
  `GenerationConfig` (`num_beams`, `max_new_tokens`, `repetition_penalty`, `length_penalty`, `temperature`) plus
  the custom field `repetition_window`.

Exactly what the original penalises for repetition: the ids *fed* to the model since generation started, i.e. the
`<s>` that opens each answer, every generated token with ext ids replaced by their base id (`<unk>` for unknown
runs), and never EOS (the `<s>` of the next answer is fed in its place). With a window, only the last
`repetition_window` fed ids count. The same set is penalised once per row: logits below zero are multiplied by the
penalty, the others divided.

Deliberate differences that do not change any result: logits are processed in float32 whatever the model dtype;
the prompt runs once per sample and its cache is then repeated for the beams; rows of sentences that are finished
keep their own (unused) state instead of copying row 0; layers without attention (`mask_modules`) simply have no
cache entry, where the original VisCPM crashes while reordering them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, LogitsProcessor, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.processing_utils import Unpack

from ...quantization import embedding_execution_device
from .encoding_cpmbee import CpmBeeSampleInfo, encode_structured
from .structure_cpmbee import (
    CHAT_KEYS,
    EXT_TABLE_KEYS,
    GENERATION_KEYS,
    INPUT_KEYS,
    SEEN_TOKEN_KEYS,
    STRUCTURE_KEYS,
    CpmBeeExtTableKwargs,
    pop_keys,
    select_keys,
)
from .tokenization_cpmbee import CpmBeeTokenizer, check_vocabulary_matches

if TYPE_CHECKING:
    from transformers import BatchEncoding

__all__ = [
    "BEAM_SEARCH_FIELD",
    "CpmBeeBeamSearchSettings",
    "CpmBeeExtTableLogitsProcessor",
    "CpmBeeGenerationMixin",
    "cpmbee_beam_search",
    "generate_answers",
]

# Generation-config field holding the original beam search's settings (for `generate_answers` and `chat`), so that
# the stock fields keep their transformers meaning for plain `generate()`.
BEAM_SEARCH_FIELD = "cpmbee_beam_search"
# Inputs `prepare_inputs_for_generation` takes besides the stock ones.
_DECLARED_INPUTS = frozenset(INPUT_KEYS) | frozenset(CHAT_KEYS)
# The logit the original gives to ids a sample cannot generate (not -inf: the repetition penalty may scale it).
MASKED_LOGIT = -10000.0


class CpmBeeExtTableLogitsProcessor(LogitsProcessor):
    """Masks `<unk>` and the ext-table ids that a sample cannot produce, as the original CPM-Bee decoder does.

    Args:
        allow_unk (`torch.Tensor` of shape `(batch,)`): the sample's ext table maps `<unk>` (its first unknown run).
        ext_table_mask (`torch.Tensor` of shape `(batch, E)`): batch ext entry `k` belongs to the sample.
        vocab_size (`int`): ids from `vocab_size` on are ext ids.
        unk_token_id (`int`): the `<unk>` id.

    Scores may have `batch * n` rows (beams, returned sequences): row `r` belongs to sample `r // n`, the layout of
    transformers' input expansion. Masked scores are set to -10000, the original's value.
    """

    def __init__(
        self, allow_unk: torch.Tensor, ext_table_mask: torch.Tensor, vocab_size: int, unk_token_id: int
    ) -> None:
        if ext_table_mask.dim() != 2 or allow_unk.shape != ext_table_mask.shape[:1]:
            raise ValueError(
                f"expected allow_unk (B,) and ext_table_mask (B, E), got {tuple(allow_unk.shape)} and "
                f"{tuple(ext_table_mask.shape)}"
            )
        self.allow_unk = allow_unk.to(torch.bool)
        self.ext_table_mask = ext_table_mask.to(torch.bool)
        self.vocab_size = vocab_size
        self.unk_token_id = unk_token_id

    @classmethod
    def from_model_kwargs(
        cls, config: PreTrainedConfig, model_kwargs: Mapping[str, Any] | None
    ) -> CpmBeeExtTableLogitsProcessor | None:
        """The processor for the kwargs of a `generate` call (`allow_unk`, `ext_table_mask` of `encode_structured`),
        or None when they do not carry both."""
        if not model_kwargs or model_kwargs.get("allow_unk") is None or model_kwargs.get("ext_table_mask") is None:
            return None
        return cls(model_kwargs["allow_unk"], model_kwargs["ext_table_mask"], config.vocab_size, config.unk_token_id)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        rows, batch = scores.shape[0], self.allow_unk.shape[0]
        if rows % batch:
            raise ValueError(f"{rows} score rows cannot be split over the {batch} samples of the processor")
        repeats = rows // batch
        num_ext = self.ext_table_mask.shape[1]
        if scores.shape[1] < self.vocab_size + num_ext:
            raise ValueError(
                f"scores have {scores.shape[1]} ids, expected vocab_size + E = {self.vocab_size + num_ext}"
            )
        # Only the `<unk>` column and the ext columns change: writing those (not a mask over the whole vocabulary)
        # keeps the processor's cost independent of the vocabulary size.
        scores = scores.clone()
        ext = slice(self.vocab_size, self.vocab_size + num_ext)
        allow_unk = self.allow_unk.to(scores.device).repeat_interleave(repeats)
        scores[:, self.unk_token_id] = scores[:, self.unk_token_id].masked_fill(~allow_unk, MASKED_LOGIT)
        ext_allowed = self.ext_table_mask.to(scores.device).repeat_interleave(repeats, dim=0)
        scores[:, ext] = scores[:, ext].masked_fill(~ext_allowed, MASKED_LOGIT)
        return scores


@dataclasses.dataclass(frozen=True)
class CpmBeeBeamSearchSettings:
    """The knobs of the original beam search; unset values take the original `_decode` defaults.

    `max_new_tokens` is the original's `max_length`: a hypothesis holds at most `max_new_tokens + 2` generated
    `(token, answer)` pairs over all its answers (the original adds 1 for EOS and forces hypotheses to end one step
    after that). A sentence stops once it has `num_beams` finished hypotheses and no running beam can beat the
    worst of them.
    """

    num_beams: int = 3
    max_new_tokens: int = 100
    repetition_penalty: float = 1.0
    repetition_window: int | None = None
    length_penalty: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 0:
            raise ValueError(
                f"need num_beams >= 1 and max_new_tokens >= 0, got {self.num_beams}, {self.max_new_tokens}"
            )
        if self.repetition_penalty < 1.0:
            raise ValueError(f"repetition_penalty must be >= 1.0 (1.0: none), got {self.repetition_penalty}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.repetition_window is not None and self.repetition_window < 0:
            raise ValueError(
                f"repetition_window must be >= 0 (0 or None: all fed tokens), got {self.repetition_window}"
            )

    @classmethod
    def from_generation_config(
        cls, generation_config: GenerationConfig | None = None, **overrides: Any
    ) -> CpmBeeBeamSearchSettings:
        """The settings of `generation_config`, then `overrides`; any unset value takes the default.

        A converted repo keeps the original's settings in the `cpmbee_beam_search` field (see
        [`~CpmBeeBeamSearchSettings.save_to`]); a generation config without it is read through its stock fields
        (`num_beams`, `max_new_tokens`, `repetition_penalty`, `length_penalty`, `temperature`, `repetition_window`).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown CPM-Bee beam search settings: {sorted(unknown)}; supported: {sorted(names)}")
        stored = getattr(generation_config, BEAM_SEARCH_FIELD, None)
        if stored is None and generation_config is not None and generation_config.do_sample:
            raise ValueError("the CPM-Bee beam search is deterministic: use `model.generate` to sample")
        if stored is not None and set(stored) - names:
            raise ValueError(f"unknown settings in `{BEAM_SEARCH_FIELD}`: {sorted(set(stored) - names)}")
        values = {}
        for name in names:
            if name in overrides:
                value = overrides[name]
            elif stored is not None:
                value = stored.get(name)
            else:
                value = getattr(generation_config, name, None)
            if value is not None:
                values[name] = value
        return cls(**values)

    def save_to(self, generation_config: GenerationConfig) -> GenerationConfig:
        """Store these settings in `generation_config`'s own field, leaving its stock fields (plain `generate()`)
        untouched."""
        setattr(generation_config, BEAM_SEARCH_FIELD, dataclasses.asdict(self))
        return generation_config


class _FinishedHypotheses:
    """The `num_beams` best finished hypotheses of one sentence, with the original's scoring and bookkeeping."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.entries: list[tuple[float, list[tuple[int, int]]]] = []
        self.worst_score = 1e9

    def add(self, pairs: list[tuple[int, int]], sum_logprobs: float) -> None:
        score = sum_logprobs / len(pairs) ** self.length_penalty
        if len(self.entries) < self.num_beams or score > self.worst_score:
            self.entries.append((score, pairs))
            if len(self.entries) > self.num_beams:
                ranked = sorted((s, index) for index, (s, _) in enumerate(self.entries))
                del self.entries[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, step: int) -> bool:
        if len(self.entries) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / step**self.length_penalty

    def best(self) -> list[tuple[int, int]]:
        return max(self.entries, key=lambda entry: entry[0])[1]


@dataclasses.dataclass(frozen=True)
class _Beam:
    """A running hypothesis: its `(token, answer_id)` pairs and what it feeds next."""

    answer_index: int
    pairs: tuple[tuple[int, int], ...]
    next_id: int
    next_sub: int
    next_segment: int
    next_position: int


def _apply_repetition_penalty(
    logits: torch.Tensor, fed_ids: torch.Tensor, penalty: float, window: int | None
) -> torch.Tensor:
    """The original rule on `fed_ids` `(rows, n)`: each id once per row, negative logits times, others divided."""
    if penalty == 1.0:
        return logits
    if window:
        fed_ids = fed_ids[:, -window:]
    # Gathered and scattered back: only the fed ids are touched (a repeated id writes the same value twice).
    fed_logits = logits.gather(1, fed_ids)
    return logits.scatter(1, fed_ids, torch.where(fed_logits < 0, fed_logits * penalty, fed_logits / penalty))


@torch.no_grad()
def cpmbee_beam_search(
    model: PreTrainedModel,
    model_inputs: BatchEncoding | Mapping[str, torch.Tensor],
    sample_infos: Sequence[CpmBeeSampleInfo],
    generation_config: GenerationConfig | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    **kwargs: Any,
) -> list[list[tuple[int, int]]]:
    """Run the original CPM-Bee beam search and return, per sample, the best hypothesis as `(token_id, answer_id)`.

    Args:
        model: a CPM-Bee head (`CpmBeeForCausalLM`, `VisCPMChatForConditionalGeneration`): its forward contract.
        model_inputs: the tensors of `encode_structured` (DESIGN.md), on the model's device.
        sample_infos: the matching `CpmBeeSampleInfo`s (answer segments and ids).
        generation_config: defaults to `model.generation_config`; see [`CpmBeeBeamSearchSettings`].
        inputs_embeds: `(B, L, dim)` prompt embeddings to use instead of embedding `input_ids` (VisCPM-Chat puts
            its image features there).
        kwargs: setting overrides (`num_beams=3`, `repetition_window=...`, ...).

    `token_id` is the generated id (ext ids stay `vocab_size + k`); each answer but the last of a finished
    hypothesis ends with EOS. Decode with `CpmBeeSampleInfo.decode_answers`.
    """
    settings = CpmBeeBeamSearchSettings.from_generation_config(
        generation_config if generation_config is not None else model.generation_config, **kwargs
    )
    config = model.config.get_text_config()
    beams_per_sample = settings.num_beams
    batch = model_inputs["attention_mask"].shape[0]
    if len(sample_infos) != batch:
        raise ValueError(f"{len(sample_infos)} sample infos for a batch of {batch}")
    rows = batch * beams_per_sample
    device = model_inputs["attention_mask"].device
    max_steps = settings.max_new_tokens + 1  # the original's `max_length`, +1 for EOS
    eos_id, bos_id = config.eos_token_id, config.bos_token_id
    vocab_size = config.vocab_size
    mask_ext_and_unk = CpmBeeExtTableLogitsProcessor.from_model_kwargs(config, model_inputs)
    if mask_ext_and_unk is None:
        raise ValueError("model_inputs need `allow_unk` and `ext_table_mask` (see `encode_structured`)")

    prompt_inputs = select_keys(model_inputs, (*SEEN_TOKEN_KEYS, *STRUCTURE_KEYS, *EXT_TABLE_KEYS))
    if inputs_embeds is None:
        prompt_inputs["input_ids"] = model_inputs["input_ids"]
    else:
        prompt_inputs["inputs_embeds"] = inputs_embeds
        prompt_inputs.pop("input_id_subs", None)
    cache = model(**prompt_inputs, use_cache=True, logits_to_keep=1).cache
    cache.batch_repeat_interleave(beams_per_sample)

    def expand(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat_interleave(beams_per_sample, dim=0)

    structure = {key: expand(model_inputs[key]) for key in SEEN_TOKEN_KEYS}
    # A generated token sees the prompt and the earlier generated tokens and borrows the last prompt token's
    # sample bookkeeping (`num_segments`, `segment_rel_offset`), as the original's incremental inference does.
    generated_structure = {
        "context": torch.zeros(rows, 1, dtype=structure["context"].dtype, device=device),
        "sample_ids": torch.zeros(rows, 1, dtype=structure["sample_ids"].dtype, device=device),
        "num_segments": structure["num_segments"][:, -1:],
        "segment_rel_offset": structure["segment_rel_offset"][:, -1:],
        "attention_mask": torch.ones(rows, 1, dtype=structure["attention_mask"].dtype, device=device),
    }
    segment_rel = expand(model_inputs["segment_rel"])
    ext_table_ids = expand(model_inputs["ext_table_ids"])
    ext_table_sub = expand(model_inputs["ext_table_sub"])
    ext_base = model_inputs["ext_table_ids"][0].tolist()
    ext_subs = model_inputs["ext_table_sub"][0].tolist()

    answers = [info.predict_segments for info in sample_infos]
    if not all(answers):
        raise ValueError('every prompt needs an "<ans>" field to generate: nothing to predict in at least one of them')
    beams = [
        [_Beam(0, (), bos_id, 0, answers[sample][0][0], 0) for _ in range(beams_per_sample)] for sample in range(batch)
    ]
    beam_scores = torch.zeros(batch, beams_per_sample, dtype=torch.float32, device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    finished = [_FinishedHypotheses(beams_per_sample, settings.length_penalty) for _ in range(batch)]
    done = [False] * batch
    fed_ids = torch.empty(rows, 0, dtype=torch.long, device=device)

    def column(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device).view(rows, 1)

    for step in range(max_steps + 1):
        if all(done):
            break
        flat = [beam for sample_beams in beams for beam in sample_beams]
        next_ids = column([beam.next_id for beam in flat])
        fed_ids = torch.cat([fed_ids, next_ids], dim=1)
        step_structure = dict(
            generated_structure,
            position_ids=column([beam.next_position for beam in flat]),
            segment_ids=column([beam.next_segment for beam in flat]),
        )
        for key in SEEN_TOKEN_KEYS:
            structure[key] = torch.cat([structure[key], step_structure[key].to(structure[key].dtype)], dim=1)
        outputs = model(
            input_ids=next_ids,
            input_id_subs=column([beam.next_sub for beam in flat]),
            **structure,
            segment_rel=segment_rel,
            ext_table_ids=ext_table_ids,
            ext_table_sub=ext_table_sub,
            cache=cache,
            use_cache=True,
        )
        cache = outputs.cache
        logits = mask_ext_and_unk(fed_ids, outputs.logits[:, -1, :].float())
        logits = _apply_repetition_penalty(logits, fed_ids, settings.repetition_penalty, settings.repetition_window)
        scores = F.log_softmax(logits / settings.temperature, dim=-1)
        num_ids = scores.shape[-1]
        next_scores = (scores + beam_scores[:, None]).view(batch, -1)
        top_scores, top_ids = torch.topk(next_scores, 2 * beams_per_sample, dim=1, largest=True, sorted=True)
        top_scores, top_ids = top_scores.tolist(), top_ids.tolist()

        new_beams: list[list[tuple[_Beam, float, int]]] = []
        for sample in range(batch):
            done[sample] = done[sample] or finished[sample].is_done(top_scores[sample][0], step)
            if done[sample]:
                # Nothing of a finished sentence is used again: keep its rows as they are.
                new_beams.append([(beam, 0.0, sample * beams_per_sample + k) for k, beam in enumerate(beams[sample])])
                continue
            candidates = []
            for flat_id, score in zip(top_ids[sample], top_scores[sample]):
                beam_id, token_id = divmod(flat_id, num_ids)
                beam = beams[sample][beam_id]
                answer_id = answers[sample][beam.answer_index][1]
                pairs = (*beam.pairs, (token_id, answer_id))
                is_last_answer = beam.answer_index + 1 == len(answers[sample])
                if (token_id == eos_id and is_last_answer) or step == max_steps:
                    finished[sample].add(list(pairs), score)
                    continue
                if token_id == eos_id:
                    next_segment = answers[sample][beam.answer_index + 1][0]
                    new_beam = _Beam(beam.answer_index + 1, pairs, bos_id, 0, next_segment, 0)
                else:
                    fed_id, fed_sub = token_id, 0
                    if token_id >= vocab_size:
                        fed_id, fed_sub = ext_base[token_id - vocab_size], ext_subs[token_id - vocab_size]
                    new_beam = _Beam(
                        beam.answer_index, pairs, fed_id, fed_sub, beam.next_segment, beam.next_position + 1
                    )
                candidates.append((new_beam, score, sample * beams_per_sample + beam_id))
                if len(candidates) == beams_per_sample:
                    break
            new_beams.append(candidates)

        if step == max_steps:
            break
        beams = [[beam for beam, _, _ in candidates] for candidates in new_beams]
        beam_scores = torch.tensor(
            [score for candidates in new_beams for _, score, _ in candidates], dtype=torch.float32, device=device
        )
        beam_idx = torch.tensor([row for candidates in new_beams for _, _, row in candidates], device=device)
        cache.reorder_cache(beam_idx)
        fed_ids = fed_ids.index_select(0, beam_idx)
        structure = {key: value.index_select(0, beam_idx) for key, value in structure.items()}

    return [hypotheses.best() for hypotheses in finished]


def generate_answers(
    model: PreTrainedModel,
    tokenizer: CpmBeeTokenizer,
    data_list: Sequence[Mapping[str, Any]],
    *,
    inputs_embeds: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    max_input_length: int | None = None,
    markup: bool = False,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Answer CPM-Bee prompt dicts: copies of `data_list` with every `<ans>` leaf filled (the original `generate`).

    Answers are real text (ext ids through the sample's table, nothing re-escaped), without the trailing EOS; an
    answer the best hypothesis never reached is `None`. `inputs_embeds` must match the encoding of `data_list` (see
    `encode_structured`); `max_input_length` and `markup` go to the encoder, everything else to
    [`cpmbee_beam_search`].
    """
    check_vocabulary_matches(tokenizer, model.config.get_text_config().vocab_size, "the model")
    encoding, infos = encode_structured(tokenizer, data_list, max_length=max_input_length, markup=markup)
    encoding = encoding.to(embedding_execution_device(model))
    results = cpmbee_beam_search(model, encoding, infos, generation_config, inputs_embeds=inputs_embeds, **kwargs)
    return [
        info.fill_answers(data, info.decode_answers(tokenizer, pairs))
        for data, info, pairs in zip(data_list, infos, results)
    ]


class CpmBeeGenerationMixin(GenerationMixin):
    """Stock `generate()` for CPM-Bee heads (CPM-Bee's causal LM, VisCPM-Chat), and `generate_answers`.

    `generate(**encoding)` works on encoded dicts with greedy, sampling or stock beam search: pass the encoded
    prompt (every key of [`CpmBeeInputKwargs`]; `answer_segment_ids` switches CPM-Bee answering on). The first step
    feeds `<s>` at position 0 of the first answer segment; every generated token is fed back at the next position of
    that segment, an ext id `vocab_size + k` as `(ext_table_ids[k], ext_table_sub[k])`, and EOS as the `<s>` of the
    next answer segment (when there is one). Generated tokens are not context: each sees the prompt and the earlier
    generated tokens, which is exactly what the original's incremental `inference` computes. Without
    `answer_segment_ids`, generated tokens continue the last prompt token's segment at the following positions.
    The structure of generated tokens is derived from the generated ids at every step, so beam reordering needs no
    bookkeeping; `ext_table_mask` and `allow_unk` drive CPM-Bee's logits processor.
    """

    def _generated_structure(
        self,
        generated: torch.Tensor,
        answer_segment_ids: torch.Tensor | None,
        last_position: torch.Tensor,
        last_segment: torch.Tensor,
        **ext_table: Unpack[CpmBeeExtTableKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fed ids, sub-ids, positions and segments of the generated tokens `generated` `(B, s)`.

        With answer segments the result has `s + 1` entries: the leading `<s>` of the first answer, then one per
        generated token (EOS becomes the next answer's `<s>` at position 0). Without, it has `s` entries continuing
        the prompt's last segment.
        """
        batch, steps = generated.shape
        text_config = self.config.get_text_config()  # read once: config attribute access is slow
        vocab_size, bos, eos = text_config.vocab_size, text_config.bos_token_id, text_config.eos_token_id
        fed = generated if answer_segment_ids is None else F.pad(generated, (1, 0), value=bos)
        ids, subs = fed, torch.zeros_like(fed)
        ext_table_ids, ext_table_sub = ext_table.get("ext_table_ids"), ext_table.get("ext_table_sub")
        if ext_table_ids is not None and ext_table_ids.shape[-1] > 0:
            is_ext = fed >= vocab_size
            ext_index = (fed - vocab_size).clamp_(0, ext_table_ids.shape[-1] - 1)
            ids = torch.where(is_ext, ext_table_ids.gather(1, ext_index), ids)
            subs = torch.where(is_ext, ext_table_sub.gather(1, ext_index), subs)
        if answer_segment_ids is None:
            positions = last_position[:, None] + 1 + torch.arange(steps, device=generated.device)
            return ids, subs, positions, last_segment[:, None].expand(batch, steps)

        # Column 0 is the first answer's `<s>`; every EOS opens the next answer (fed as its `<s>` at position 0).
        is_eos = torch.isin(fed, torch.tensor(eos, device=fed.device)) if isinstance(eos, list) else fed == eos
        is_eos[:, 0] = False
        answer_start = is_eos.clone()
        answer_start[:, 0] = True
        ids, subs = ids.masked_fill(is_eos, bos), subs.masked_fill(is_eos, 0)
        last_answer = (answer_segment_ids >= 0).sum(dim=1, keepdim=True).sub_(1).clamp_(min=0)
        answer_index = torch.minimum(answer_start.cumsum(dim=1).sub_(1), last_answer)
        segments = answer_segment_ids.gather(1, answer_index)
        order = torch.arange(steps + 1, device=fed.device)
        positions = order - torch.cummax(order * answer_start, dim=1).values
        return ids, subs, positions, segments

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict:
        """Build the forward inputs of one generation step from the prompt structure and the generated ids.

        The structure kwargs keep the prompt's length `L` for the whole of `generate` (see
        `_update_model_kwargs_for_generation`); the generated tokens' structure is re-derived here.
        """
        prompt = pop_keys(kwargs, STRUCTURE_KEYS)
        ext_table = pop_keys(kwargs, EXT_TABLE_KEYS)
        answer_segment_ids = pop_keys(kwargs, GENERATION_KEYS).get("answer_segment_ids")
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is None:
            raise ValueError("The prompt's `position_ids` are needed to tell the prompt from the generated tokens.")
        batch = input_ids.shape[0]
        device = input_ids.device
        prompt_length = position_ids.shape[-1]
        num_prefix = 0 if answer_segment_ids is None else 1
        steps = max(input_ids.shape[1] - prompt_length, 0)
        if cache is None:
            past_length = 0
        elif is_first_iteration:
            past_length = int(cache.get_seq_length())  # a cache passed in may already hold tokens
            if past_length > 0:
                steps = past_length - prompt_length - num_prefix + 1
        else:
            # A decoding step: everything but the newest token is cached (read from the shapes, not the device).
            past_length = prompt_length + num_prefix + steps - 1
        generated = input_ids[:, input_ids.shape[1] - steps :]

        def prompt_or(name: str, fill) -> torch.Tensor:
            tensor = attention_mask if name == "attention_mask" else prompt.get(name)
            if tensor is not None:
                return tensor
            return torch.full((batch, prompt_length), fill, dtype=torch.long, device=device)

        prompt_segments = prompt_or("segment_ids", 0)
        prompt_num_segments = prompt.get("num_segments")
        if prompt_num_segments is None:
            prompt_num_segments = prompt_or("attention_mask", 1).ne(0).long()
        fed_ids, fed_subs, fed_positions, fed_segments = self._generated_structure(
            generated, answer_segment_ids, position_ids[:, -1], prompt_segments[:, -1], **ext_table
        )
        fed_length = fed_ids.shape[1]

        # What a generated token is: at its answer position and segment, not context, in the query sample, real;
        # it borrows the last prompt token's sample bookkeeping (`num_segments`, `segment_rel_offset`).
        prompt_structure = {
            "position_ids": position_ids,
            "context": prompt_or("context", 0),
            "sample_ids": prompt_or("sample_ids", 0),
            "num_segments": prompt_num_segments,
            "segment_ids": prompt_segments,
            "segment_rel_offset": prompt_or("segment_rel_offset", 0),
            "attention_mask": prompt_or("attention_mask", 1),
        }
        zeros = torch.zeros_like(fed_ids)
        generated_structure = {
            "position_ids": fed_positions,
            "context": zeros,
            "sample_ids": zeros,
            "num_segments": prompt_num_segments[:, -1:].expand(batch, fed_length),
            "segment_ids": fed_segments,
            "segment_rel_offset": prompt_structure["segment_rel_offset"][:, -1:].expand(batch, fed_length),
            "attention_mask": torch.ones_like(fed_ids),
        }
        # All of it in one `(keys, B, width)` tensor, built by a few ops (this runs at every decoding step); a static
        # cache gets one entry per slot (the unused ones are padding), so that every decoding step has the same
        # input shapes and a compiled forward is built once.
        parts = [
            torch.stack([prompt_structure[key].long() for key in SEEN_TOKEN_KEYS]),
            torch.stack([generated_structure[key].long() for key in SEEN_TOKEN_KEYS]),
        ]
        slots = cache.get_max_length() if cache is not None else -1
        if slots > prompt_length + fed_length:
            parts.append(parts[1].new_zeros(len(SEEN_TOKEN_KEYS), batch, slots - prompt_length - fed_length))
        structure = dict(zip(SEEN_TOKEN_KEYS, torch.cat(parts, dim=2).unbind(0)))
        structure["context"] = structure["context"].bool()
        query_length = prompt_length + fed_length - past_length
        prompt_part = max(query_length - fed_length, 0)
        fed_part = slice(fed_length - (query_length - prompt_part), fed_length)

        model_inputs = {"input_ids": None, "inputs_embeds": None}
        if prompt_part > 0 and inputs_embeds is not None and is_first_iteration:
            fed_embeds = self.embed_input_ids(fed_ids, fed_subs).to(inputs_embeds.dtype)
            model_inputs["inputs_embeds"] = torch.cat([inputs_embeds[:, prompt_length - prompt_part :], fed_embeds], 1)
        else:
            step_ids, step_subs = fed_ids[:, fed_part], fed_subs[:, fed_part]
            if prompt_part > 0:
                prompt_ids = input_ids[:, prompt_length - prompt_part : prompt_length]
                prompt_subs = prompt_or("input_id_subs", 0)[:, prompt_length - prompt_part :].to(step_subs.dtype)
                step_ids, step_subs = torch.cat([prompt_ids, step_ids], 1), torch.cat([prompt_subs, step_subs], 1)
            else:
                # Fresh tensors, not views of the growing generated ids: their strides would change every step (and
                # a compiled step would be rebuilt).
                step_ids, step_subs = (
                    part.clone(memory_format=torch.contiguous_format) for part in (step_ids, step_subs)
                )
            model_inputs["input_ids"], model_inputs["input_id_subs"] = step_ids, step_subs

        model_inputs.update(structure, **select_keys(prompt, ("segment_rel",)), **ext_table, cache=cache)
        for key, value in kwargs.items():
            model_inputs.setdefault(key, value)
        return model_inputs

    def _update_model_kwargs_for_generation(
        self,
        outputs: ModelOutput,
        model_kwargs: dict,
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict:
        """Only carry the cache over: the prompt structure kwargs stay as given (see `prepare_inputs_for_generation`)."""
        if "cache" in outputs:
            model_kwargs["cache"] = outputs["cache"]
        return model_kwargs

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """Answer mode feeds one token more than it generates (the answer's leading `<s>`): a static cache gets the
        extra slot."""
        if model_kwargs.get("answer_segment_ids") is not None:
            max_cache_length += 1
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def _get_logits_processor(self, generation_config, *args, model_kwargs=None, **kwargs):
        """Stock processors, preceded by the original's per-sample `<unk>`/ext-table mask when the prompt has it."""
        processors = super()._get_logits_processor(generation_config, *args, model_kwargs=model_kwargs, **kwargs)
        processor = CpmBeeExtTableLogitsProcessor.from_model_kwargs(self.config.get_text_config(), model_kwargs)
        if processor is not None:
            processors.insert(0, processor)
        return processors

    def _validate_model_kwargs(self, model_kwargs: dict[str, Any]) -> None:
        """The declared CPM-Bee inputs are taken by `prepare_inputs_for_generation`; stock checks for the rest."""
        super()._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in _DECLARED_INPUTS})

    # `model.generate_answers(tokenizer, data_list, **settings)`: the original's beam search, answers filled in.
    generate_answers = generate_answers
