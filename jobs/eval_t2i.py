"""Evaluate generated images: FID against a reference set and CLIP score against their prompts, logged to MLflow.

    # the reference statistics once (e.g. 30K COCO val images), then every model against them
    python jobs/eval_t2i.py --generated out/samples --reference 'data/coco_val2014/*.jpg' \\
        --inception weights/pt_inception-2015-12-05-6726825d.pth --save-reference-stats stats/coco_256.npz \\
        --clip-model ViT-B-32 --clip-pretrained weights/open_clip_vit_b_32_laion2b.bin
    python jobs/eval_t2i.py --generated out/samples --reference stats/coco_256.npz \\
        --inception weights/pt_inception-2015-12-05-6726825d.pth \\
        --clip-model ViT-B-32 --clip-pretrained weights/open_clip_vit_b_32_laion2b.bin \\
        --mlflow-uri http://mlflow:5000 --run-id TRAINING_RUN_ID --step 200000

    # on a GPU node of a Ray cluster (the weights on shared storage or in the working dir)
    ray job submit --entrypoint-num-gpus 1 --working-dir . -- python jobs/eval_t2i.py \\
        --generated s3://bucket/samples/t2i-7b --reference s3://bucket/stats/coco_256.npz \\
        --inception /mnt/weights/pt_inception-2015-12-05-6726825d.pth --clip-model ViT-B-32 \\
        --clip-pretrained /mnt/weights/open_clip_vit_b_32_laion2b.bin --device cuda --batch-size 100 \\
        --mlflow-uri http://mlflow:5000

--generated is a jobs/generate.py output directory (images/ + samples.parquet; each image is scored against its own
prompt). --reference is a directory of images (searched recursively), a glob, or a .npz of statistics (mu, sigma,
n: ours from --save-reference-stats, pytorch-fid's or clean-fid's), local or s3://. Reference images are resized
and centre-cropped (ADM's center_crop_arr) to the generated images' side; a file that does not decode is counted
and listed, never fatal. --inception is a LOCAL copy of the FID Inception-v3 weights (pytorch-fid's
pt_inception-2015-12-05-6726825d.pth, or the same file from torch-fidelity's release); nothing is downloaded. The
CLIP score is 100 * max(cos, 0) averaged over images (torchmetrics' CLIPScore), next to the raw mean cosine.

Writes the metrics JSON (default GENERATED/eval.json). With --mlflow-uri (or MLFLOW_TRACKING_URI) it logs a run in
--experiment (default t2i-eval), or into an existing run with --run-id (e.g. the training run, at --step): the
configuration (params; tags in an existing run), the metrics fid, clip_score, clip_cosine, n_generated,
n_reference, n_reference_rejected, and the JSON as the artifact eval/eval.json.

GenEval runs with its own evaluator (an mmdetection Mask2Former; https://github.com/djghosh13/geneval, whose README
gives the setup and commands) on a GPU machine, from images written with jobs/generate.py --geneval-layout and
--prompts geneval/prompts/evaluation_metadata.jsonl --images-per-prompt 4:

    git clone https://github.com/djghosh13/geneval && cd geneval    # conda env from environment.yml, then
    mim install mmdet==2.27.0 && ./evaluation/download_models.sh "<OBJECT_DETECTOR_FOLDER>/"
    python evaluation/evaluate_images.py "<IMAGE_FOLDER>" --outfile "<RESULTS_FOLDER>/results.jsonl" \\
        --model-path "<OBJECT_DETECTOR_FOLDER>"
    python evaluation/summary_scores.py "<RESULTS_FOLDER>/results.jsonl"

This job refuses a GenEval-layout directory (its prompts test composition, not a distribution for FID).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json
import logging

from pipelines.eval_t2i import EvalT2IConfig, evaluate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generated", required=True, help="jobs/generate.py output directory (path or URI)")
    p.add_argument("--reference", help="reference images: a directory, a glob, or a .npz of statistics")
    p.add_argument("--inception", help="local path of the FID Inception-v3 weights (or a torch.export .pt2 archive)")
    p.add_argument("--clip-model", help="open_clip model name (omit to skip the CLIP score)")
    p.add_argument("--clip-pretrained", help="open_clip checkpoint: a local path (or a tag, downloaded when online)")
    p.add_argument("--clip-model-config", help="JSON open_clip config to register (custom architectures)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--image-size", type=int, help="reference side (default: the generated images' side)")
    p.add_argument("--save-reference-stats", help="write the reference statistics (.npz) here")
    p.add_argument("--limit", type=int, help="at most this many generated and reference images (a quick check)")
    p.add_argument("--workers", type=int, default=8, help="threads reading and decoding images")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL for s3:// paths")
    p.add_argument("--output", help="metrics JSON (default: GENERATED/eval.json)")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="default: $MLFLOW_TRACKING_URI")
    p.add_argument("--experiment", default="t2i-eval", help="MLflow experiment of a new run")
    p.add_argument("--run-id", help="log into this existing MLflow run instead (e.g. the training run)")
    p.add_argument("--run-name", help="name of a new MLflow run")
    p.add_argument("--step", type=int, help="MLflow step of the metrics (e.g. the checkpoint's training step)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        if args.clip_model and not args.clip_pretrained:
            raise ValueError(
                "--clip-model needs --clip-pretrained (a local checkpoint): random CLIP weights score noise"
            )
        if args.run_id and not args.mlflow_uri:
            raise ValueError("--run-id needs --mlflow-uri (or MLFLOW_TRACKING_URI)")
        cfg = EvalT2IConfig(
            generated=args.generated,
            reference=args.reference,
            inception=args.inception,
            clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained,
            clip_model_config=args.clip_model_config,
            batch_size=args.batch_size,
            device=args.device,
            image_size=args.image_size,
            save_reference_stats=args.save_reference_stats,
            limit=args.limit,
            workers=args.workers,
            s3_endpoint=args.s3_endpoint,
        )
        if args.mlflow_uri and args.run_id:
            from pipelines.tracking import check_run

            check_run(args.mlflow_uri, args.run_id)
        result = evaluate(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import fsspec

    output = args.output or args.generated.rstrip("/") + "/eval.json"
    with fsspec.open(output, "w", **cfg.storage_options) as fh:
        json.dump(result, fh, indent=1, sort_keys=True)
    summary = ", ".join(
        f"{k} {result[k]:.4f}" if isinstance(result[k], float) else f"{k} {result[k]}"
        for k in ("fid", "clip_score", "clip_cosine", "n_generated", "n_reference", "n_reference_rejected")
        if result[k] is not None
    )
    print(f"{summary}; wrote {output}")
    if args.mlflow_uri:
        from pipelines.tracking import log_eval_run

        run_id = log_eval_run(
            result,
            tracking_uri=args.mlflow_uri,
            experiment=args.experiment,
            run_id=args.run_id,
            run_name=args.run_name,
            step=args.step,
        )
        print(f"mlflow: run {run_id} at {args.mlflow_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
