"""Ask a trained understanding model about an image (the answer streams as it is generated), or caption a corpus.

    python jobs/chat.py --model demo_output/runs/i2t-tiny/model --tokenizer demo_output/runs/tokenizer-tiny/tokenizer \\
        --image samples/images/chelsea.jpg --prompt "What is in the image?"
    python jobs/chat.py --model runs/i2t/model --tokenizer tok/siglip_384 --images 'data/photos/*.jpg' \\
        --prompt "Describe the image." --output captions/ --actors 8 --gpus-per-actor 1
    python jobs/chat.py --model runs/i2t/model --tokenizer tok/siglip_384 --shards tokens/ --output captions/

Without --image the question is asked without one. --images (a glob) and --shards (token shards: a pretokenize
output directory, Parquet files or globs) answer --prompt for every input through Ray Data on an actor pool and
write OUTPUT/answers.parquet (key, source, prompt, answer, and a reason for an input that has none).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json
import logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the understanding model directory (train_i2t output or converted)")
    p.add_argument("--tokenizer", required=True, help="the image tokenizer the model was trained with")
    p.add_argument("--prompt", default="Describe the image.", help="the question")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--image", help="one image file (path or URI): answer here, streaming")
    source.add_argument("--images", help="a glob of image files: answer each through Ray Data")
    source.add_argument("--shards", action="append", help="token shards: answer each row through Ray Data")
    p.add_argument("--output", help="with --images/--shards: the output directory (path or URI)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="with --image: cpu or cuda")
    p.add_argument("--batch-size", type=int, default=8, help="with --images/--shards: questions per forward")
    p.add_argument("--actors", type=int, default=1, help="with --images/--shards: model actors (one per GPU)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--storage-options", help='JSON fsspec options for URIs, e.g. \'{"endpoint_url": "http://..."}\'')
    return p.parse_args(argv)


def ask(args, options: dict | None) -> None:
    import fsspec
    from transformers import TextStreamer

    from tokenflow.llm.chat import Assistant

    assistant = Assistant.load(args.model, args.tokenizer, device=args.device, storage_options=options)
    image = None
    if args.image:
        with fsspec.open(args.image, "rb", **(options or {})) as fh:
            image = fh.read()
    streamer = TextStreamer(assistant.text_tokenizer, skip_prompt=True, skip_special_tokens=True)
    assistant.answer(
        [image],
        [args.prompt],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        streamer=streamer,  # prints the answer as it is generated, then a newline
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        options = json.loads(args.storage_options) if args.storage_options else None
        if args.images is None and args.shards is None:
            if args.output:
                raise ValueError("--output goes with --images or --shards")
            ask(args, options)
            return 0
        from pipelines.caption import CaptionConfig, run

        summary = run(
            CaptionConfig(
                model=args.model,
                tokenizer=args.tokenizer,
                prompt=args.prompt,
                output=args.output or "",
                images=args.images,
                shards=args.shards,
                batch_size=args.batch_size,
                actors=args.actors,
                gpus_per_actor=args.gpus_per_actor,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                storage_options=options,
            )
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{summary['answered']} of {summary['rows']} inputs answered; rejected {summary['reasons'] or 'none'}")
    print(f"output: {summary['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
