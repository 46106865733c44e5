"""Convert a published TokenFlow or UniTok checkpoint into a tokenizer directory this project loads.

    python jobs/convert_checkpoint.py --kind tokenflow --input tokenflow_clipb_32k_enhanced.pt --output tok/clipb_256
    python jobs/convert_checkpoint.py --kind tokenflow --input s3://models/tokenflow_siglip_32k.pt \\
        --output s3://models/tokenizers/siglip_384
    python jobs/convert_checkpoint.py --kind unitok --input unitok_tokenizer.pth --output tok/unitok
    python jobs/convert_checkpoint.py --kind tokenflow-t2i --input TokenFlow-t2i/ --output models/t2i
    python jobs/convert_checkpoint.py --kind tokenflow-llava --input Tokenflow-llava-qwen2.5-14B-finetuning/ \\
        --output models/i2t [--image-tokenizer-id FINGERPRINT]

The preset is recognised from the file (clipb_256 for the enhanced-decoder clipb file, siglip_384 for
TokenFlow-XL, unitok); `--preset` forces one. The output (`config.json` + `model.safetensors`, with the source's
sha256 in config.json) is what `jobs/pretokenize.py --tokenizer` and `Tokenizer.from_pretrained` take.
`tokenflow-t2i` converts the released text-to-image model directory (safetensors shards, or .bin read with
weights_only=True) into a `T2IModel` directory (`jobs/generate.py --model`), its tokenizer files copied. The file is
read with torch.load(weights_only=True): a checkpoint that needs any other class unpickled is refused, and one
whose tensors do not map exactly onto the preset fails with the list of missing and unexpected keys.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json

from tokenflow.config import PRESETS
from tokenflow.convert import convert_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--kind",
        required=True,
        choices=("tokenflow", "unitok", "tokenflow-t2i", "tokenflow-llava"),
        help="which official code wrote it",
    )
    p.add_argument("--input", required=True, help="official checkpoint: local path or fsspec URI (s3://...)")
    p.add_argument("--output", required=True, help="tokenizer directory to write: local path or URI")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="force a preset instead of detecting it")
    p.add_argument(
        "--storage-options",
        default=None,
        help='JSON fsspec options for --input/--output URIs, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )
    p.add_argument(
        "--image-tokenizer-id",
        default=None,
        help="tokenflow-llava: fingerprint of the converted image tokenizer to record with the model",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = json.loads(args.storage_options) if args.storage_options else None
    if args.image_tokenizer_id is not None and args.kind != "tokenflow-llava":
        print("convert_checkpoint: --image-tokenizer-id is for --kind tokenflow-llava", file=sys.stderr)
        return 2
    if args.kind == "tokenflow-t2i":
        from tokenflow.llm.convert import convert_t2i_checkpoint

        try:
            model = convert_t2i_checkpoint(args.input, args.output, storage_options=options)
        except (ValueError, FileNotFoundError) as err:
            print(f"convert_checkpoint: {err}", file=sys.stderr)
            return 2
        n = sum(t.numel() for t in model.state_dict().values())
        print(f"wrote {args.output}: TokenFlow-t2i -> {model.num_layers} layers, {n:,} weights")
        return 0
    if args.kind == "tokenflow-llava":
        from tokenflow.llm.convert_i2t import convert_i2t_checkpoint

        try:
            model = convert_i2t_checkpoint(
                args.input, args.output, image_tokenizer_id=args.image_tokenizer_id, storage_options=options
            )
        except (ValueError, FileNotFoundError) as err:
            print(f"convert_checkpoint: {err}", file=sys.stderr)
            return 2
        n = sum(t.numel() for t in model.state_dict().values())
        layers = model.llm.config.num_hidden_layers
        print(f"wrote {args.output}: TokenFlow llava (Qwen2) -> {layers} layers, {n:,} weights")
        return 0
    try:
        tok = convert_checkpoint(args.kind, args.input, args.output, preset_name=args.preset, storage_options=options)
    except (ValueError, FileNotFoundError) as err:
        print(f"convert_checkpoint: {err}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in tok.state_dict().values())
    print(
        f"wrote {args.output}: {args.kind} -> {tok.config.image_size} px, {tok.tokens_per_image} tokens per image, "
        f"{n:,} weights, fingerprint {tok.fingerprint()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
