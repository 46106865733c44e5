"""Parity fixture of the OFFICIAL TokenFlow text-to-image LLM (ByteFlow-AI/TokenFlow @9812da0, `t2i/llava_t2i`),
tiny and seeded, CPU fp32.

The official code is imported at run time from `--official-repo` (bench/official/t2i.py; never copied here) and
run in its own venv. Weights: `tests/parity/t2i_recipe.official_t2i_state_dict(0)` for the LLM and
`tests/parity/tokenflow_recipe.official_state_dict("clipb_256", 0)` for the TokenFlow tokenizer in its VQTower.

    /work/offenv/bin/python bench/t2i_parity.py --official-repo /work/official/TokenFlow --threads 2 \\
        [--write-fixture tests/fixtures/t2i_official/tiny.npz]

What runs (all official): the training-layout teacher-forced `forward` on a batch made by the official data code
(`preprocess` with the plain_img template + `DataCollatorForSupervisedDataset`), and greedy
`autoregressive_infer_cfg` (top-k 1) at cfg 0, cfg 3 and cfg 3 with three refinement passes per scale. Checks
printed: strict load; official prefixes/layout equal t2i_recipe's; teacher-forced argmax over the image ids on
the cfg-0 greedy codes equals those codes (817/817 per prompt); the same for cfg 3 combining a conditional and
an unconditional teacher-forced forward with the official guidance weight; distinct codes per image; min gaps.
See tests/fixtures/t2i_official/README.md for the fixture's keys.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.parity import t2i_recipe as R  # noqa: E402

SEED = 0
TF_TOKEN_SEED = 1
COLUMN_SEED = 2
N_TEXT_COLUMNS = 40
N_IMAGE_COLUMNS = 260


def scale_of_image_positions() -> torch.Tensor:
    """(817,) index si of the scale each image token belongs to (0..8)."""
    return torch.cat([torch.full((s * s,), i) for i, s in enumerate(R.SCALES)])


def columns() -> np.ndarray:
    """300 fixed vocab ids: 40 text ids (unk, BOS, EOS, the <img>/</img> pieces, [PAD], then evenly spaced text
    ids) and 260 image ids (codes 0, 1 (the sampler's placeholder), 32767, then random codes), sorted."""
    text = [0, R.BOS_ID, R.EOS_ID, *R.IMAGE_OPEN, *R.IMAGE_CLOSE, R.PAD_ID]
    text = list(dict.fromkeys(text))
    for i in np.linspace(3, R.TEXT_VOCAB - 1, 64).round().astype(int).tolist():
        if len(text) == N_TEXT_COLUMNS:
            break
        if i not in text:
            text.append(i)
    image = [0, 1, R.CODEBOOK - 1]
    for c in torch.randperm(R.CODEBOOK, generator=torch.Generator().manual_seed(COLUMN_SEED)).tolist():
        if len(image) == N_IMAGE_COLUMNS:
            break
        if c not in image:
            image.append(c)
    assert len(text) == N_TEXT_COLUMNS and len(image) == N_IMAGE_COLUMNS
    return np.array(sorted(text) + sorted(R.IMAGE_TOKEN_START + c for c in image), dtype=np.int64)


def positions(seq_len: int) -> np.ndarray:
    """Sequence positions whose logits the fixture keeps: every 5th from 120, the last PAD / BOS positions of the
    two padded prompts, the last "<img>" piece (130: predicts the first image token), the last two image
    positions and everything after the image (</img> pieces, EOS)."""
    keep = set(range(120, seq_len, 5))
    for caption in R.PROMPTS:
        n = len(caption) + 1
        if n < R.MAX_TEXT_TOKENS:
            bos = R.MAX_TEXT_TOKENS - n
            keep |= {bos - 1, bos}
    first_image = R.PREFIX_LEN
    last_image = first_image + R.IMAGE_TOKENS - 1
    keep |= {first_image - 1, last_image - 1} | set(range(last_image, seq_len))
    return np.array(sorted(keep), dtype=np.int64)


def teacher_forced(adapter, repo, model, captions, codes):
    """The official training batch for (captions, codes) and the official forward on it."""
    batch = adapter.official_training_batch(repo, captions, codes)
    out = adapter.official_forward(
        model, batch["input_ids"], batch["labels"], batch["text_labels"], batch["attention_mask"]
    )
    return batch, out


def image_argmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, L, V) -> (B, 817): argmax over the image ids at the positions predicting the image tokens (130..946),
    as 0-based codes."""
    first = R.PREFIX_LEN - 1
    return logits[:, first : first + R.IMAGE_TOKENS, R.IMAGE_TOKEN_START :].argmax(-1)


def gaps_per_position(gaps) -> np.ndarray:
    """(B, 817): for each image position, the smallest top-1/top-2 gap over the sampler calls that drew it (one
    call per scale, three per scale after the first for the refinement run; a call's length pn*pn names its
    scale)."""
    starts, cur = {}, 0
    for s in R.SCALES:
        starts[s * s] = cur
        cur += s * s
    out = torch.full((gaps[0].shape[0], R.IMAGE_TOKENS), float("inf"))
    for g in gaps:
        lo = starts[g.shape[1]]
        out[:, lo : lo + g.shape[1]] = torch.minimum(out[:, lo : lo + g.shape[1]], g)
    assert torch.isfinite(out).all()
    return out.numpy().astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-repo", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-fixture", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repo = args.official_repo

    from bench.official import t2i as adapter

    start = time.perf_counter()
    model = adapter.build_official_t2i(repo, seed=SEED)
    print(
        f"built the official LlavaLlamaForCausalLM ({time.perf_counter() - start:.1f} s): state_dict keys/shapes "
        f"== t2i_recipe.official_t2i_shapes() ({len(R.official_t2i_shapes())} tensors), strict load OK, "
        f"VQTower TokenFlow holds the clipb_256 seed-{SEED} weights"
    )

    # Prefixes: the official function on the stand-in tokenizer must give t2i_recipe's ids.
    prefixes = [R.prefix_ids(c) for c in R.PROMPTS]
    for caption, prefix in zip(R.PROMPTS + [[]], prefixes + [R.NULL_PREFIX]):
        assert adapter.official_prefix(repo, caption) == prefix, caption
    print(
        f"official crop_and_encode_text_and_img == t2i_recipe.prefix_ids for the 3 prompts and the null caption "
        f"(caption lengths {[len(c) for c in R.PROMPTS]}, prefix length {len(prefixes[0])})"
    )

    # Teacher-forced forward on random codes.
    tf_codes = torch.randint(
        0, R.CODEBOOK, (len(R.PROMPTS), R.IMAGE_TOKENS), generator=torch.Generator().manual_seed(TF_TOKEN_SEED)
    )
    start = time.perf_counter()
    batch, out = teacher_forced(adapter, repo, model, R.PROMPTS, tf_codes)
    tf_time = time.perf_counter() - start
    ids = batch["input_ids"]
    want = torch.tensor([R.training_ids(c, k) for c, k in zip(R.PROMPTS, tf_codes.tolist())])
    assert torch.equal(ids, want), "official training layout differs from t2i_recipe.training_ids"
    assert bool(batch["attention_mask"].all())
    logits = out.logits.float()
    assert torch.isfinite(logits).all()
    pos = positions(ids.shape[1])
    cols = columns()
    pad_rows = (ids[:, pos] == R.PAD_ID).numpy()
    tf = dict(
        tf_image_tokens=tf_codes.numpy(),
        tf_input_ids=ids.numpy(),
        tf_labels=batch["labels"].numpy(),
        tf_text_labels=batch["text_labels"].numpy(),
        tf_positions=pos,
        tf_pad_rows=pad_rows,
        tf_columns=cols,
        tf_logits=logits[:, pos][:, :, cols].numpy().astype(np.float32),
        tf_logsumexp=torch.logsumexp(logits[:, pos], dim=-1).numpy().astype(np.float32),
        tf_image_argmax=image_argmax(logits).numpy(),
        tf_loss=np.float32(out.loss.item()),
        tf_loss_vision=np.float32(out.loss_vision.item()),
        tf_loss_text=np.float32(out.loss_text.item()),
    )
    per_prompt, noise = [], 0.0
    for i in range(len(R.PROMPTS)):
        _, o = teacher_forced(adapter, repo, model, R.PROMPTS[i : i + 1], tf_codes[i : i + 1])
        assert torch.allclose(o.logits, logits[i : i + 1], atol=1e-4, rtol=1e-4)
        noise = max(noise, float((o.logits - logits[i : i + 1]).abs().max()))
        per_prompt.append([o.loss.item(), o.loss_vision.item(), o.loss_text.item()])
    tf["tf_loss_per_prompt"] = np.array(per_prompt, dtype=np.float32)
    print(
        f"teacher-forced forward (3 x {ids.shape[1]} ids, {tf_time:.1f} s): loss {tf['tf_loss']:.5f} = "
        f"loss_vision {tf['tf_loss_vision']:.5f} + loss_text {tf['tf_loss_text']:.5f}; logits kept at "
        f"{len(pos)} positions x {len(cols)} columns; per-prompt (batch of one) losses "
        f"{np.round(tf['tf_loss_per_prompt'], 5).tolist()}; max |logit| {float(logits.abs().max()):.3g}, max "
        f"|batch-of-3 - batch-of-1 logits| {noise:.3g} (fp32 noise of the official code against itself)"
    )

    # Greedy sampling with the official sampler.
    runs = {
        "greedy_cfg0": dict(cfg=0.0, topk_list=[1], topp_list=[0]),
        "greedy_cfg3": dict(cfg=3.0, topk_list=[1], topp_list=[0]),
        "greedy_loop3": dict(cfg=3.0, topk_list=[1, 1, 1], topp_list=[0, 0, 0]),
    }
    greedy = {}
    for name, kw in runs.items():
        start = time.perf_counter()
        codes, gaps, _ = adapter.official_generate(
            repo, model, prefixes, [R.NULL_PREFIX] * len(prefixes), g_seed=0, **kw
        )
        per_position = gaps_per_position(gaps)
        greedy[name] = codes.numpy()
        greedy[name + "_gaps"] = per_position
        greedy[name + "_min_gap"] = np.float32(per_position.min())
        distinct = [len(set(row.tolist())) for row in codes]
        small = {tol: int((per_position < tol).sum()) for tol in (1e-4, 1e-3, 1e-2)}
        print(
            f"{name} ({kw}): {len(gaps)} sampler calls, {time.perf_counter() - start:.1f} s; distinct codes per "
            f"image {distinct}; min top-1/top-2 gap after CFG {greedy[name + '_min_gap']:.3g} "
            f"(median {float(np.median(per_position)):.3g}); positions with gap below "
            + ", ".join(f"{tol:g}: {n}" for tol, n in small.items())
            + f" of {per_position.size}; smallest gap at (prompt, position) "
            f"{np.unravel_index(per_position.argmin(), per_position.shape)}"
        )

    # Self-checks: teacher forcing on the greedy codes reproduces them.
    cfg0 = torch.from_numpy(greedy["greedy_cfg0"])
    _, out0 = teacher_forced(adapter, repo, model, R.PROMPTS, cfg0)
    agree0 = (image_argmax(out0.logits) == cfg0).sum(-1).tolist()
    print(f"check: teacher-forced argmax over image ids on greedy_cfg0 codes == greedy_cfg0 at {agree0} / 817")

    cfg3 = torch.from_numpy(greedy["greedy_cfg3"])
    _, cond = teacher_forced(adapter, repo, model, R.PROMPTS, cfg3)
    _, uncond = teacher_forced(adapter, repo, model, [[]] * len(R.PROMPTS), cfg3)
    first = R.PREFIX_LEN - 1
    c = cond.logits[:, first : first + R.IMAGE_TOKENS, R.IMAGE_TOKEN_START :]
    u = uncond.logits[:, first : first + R.IMAGE_TOKENS, R.IMAGE_TOKEN_START :]
    t = (3.0 * scale_of_image_positions() / (len(R.SCALES) - 1))[None, :, None]
    agree3 = (((1 + t) * c - t * u).argmax(-1) == cfg3).sum(-1).tolist()
    print(f"check: (1+t)·cond - t·uncond teacher-forced (t = 3·si/8) argmax == greedy_cfg3 at {agree3} / 817")
    loop_differs = (torch.from_numpy(greedy["greedy_loop3"]) != cfg3).sum(-1).tolist()
    print(f"greedy_loop3 differs from greedy_cfg3 at {loop_differs} positions (the refinement passes)")
    if agree0 != [R.IMAGE_TOKENS] * 3 or agree3 != [R.IMAGE_TOKENS] * 3:
        raise SystemExit("self-check failed")

    if args.write_fixture:
        os.makedirs(os.path.dirname(os.path.abspath(args.write_fixture)), exist_ok=True)
        np.savez_compressed(
            args.write_fixture,
            seed=np.int64(SEED),
            prompt_prefixes=np.array(prefixes, dtype=np.int64),
            null_prefix=np.array(R.NULL_PREFIX, dtype=np.int64),
            prompt_lengths=np.array([len(c) for c in R.PROMPTS], dtype=np.int64),
            **tf,
            **greedy,
        )
        size = os.path.getsize(args.write_fixture)
        print(
            f"wrote {args.write_fixture} ({size / 1e6:.2f} MB); torch {torch.__version__}, "
            f"python {platform.python_version()}, {platform.machine()}, {args.threads} threads"
        )


if __name__ == "__main__":
    main()
