import torch

from tokenflow import Tokenizer


def test_save_and_load_through_s3(s3_endpoint):
    opts = {"endpoint_url": s3_endpoint}
    tok = Tokenizer.from_preset("tiny").eval()
    tok.save_pretrained("s3://tokenflow-test/tokenizers/tiny", storage_options=opts)
    loaded = Tokenizer.from_pretrained("s3://tokenflow-test/tokenizers/tiny", storage_options=opts)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(loaded.encode(x), tok.encode(x))
    assert loaded.config == tok.config


def official_layout(tok: Tokenizer) -> dict[str, torch.Tensor]:
    """`tok`'s weights under the official TokenFlow key names (the converter's renames, inverted), plus the
    usage buffer official files carry: a small stand-in for a released checkpoint."""
    renames = [
        ("model.semantic_encoder.visual.", "encoder_vqkd."),
        ("model.semantic_decoder.patch_embed.", "decoder_vqkd.patch_embed.proj."),
        ("model.semantic_decoder.", "decoder_vqkd."),
        ("model.pixel_encoder.", "encoder."),
        ("model.pixel_decoder.", "decoder."),
        ("model.quantizer.quantizer.codebooks.0.", "quantize.embedding_vqkd."),
        ("model.quantizer.quantizer.codebooks.1.", "quantize.embedding_vqgan."),
        ("model.", ""),
    ]
    out = {}
    for key, value in tok.state_dict().items():
        old, new = next((o, n) for o, n in renames if key.startswith(o))
        out[new + key[len(old) :]] = value.clone()
    out["quantize.codebook_used"] = torch.zeros(4 * tok.codebook_size)
    return out


def test_convert_checkpoint_from_and_to_s3(s3_endpoint, tmp_path):
    import argparse
    import hashlib
    import json

    import fsspec

    from jobs.convert_checkpoint import main

    opts = {"endpoint_url": s3_endpoint}
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("tiny").eval()
    local = tmp_path / "official.pt"
    torch.save({"model": official_layout(tok), "args": argparse.Namespace(image_size=64), "steps": 7}, local)
    src, dst = "s3://tokenflow-test/official/tiny.pt", "s3://tokenflow-test/converted/tiny"
    fs = fsspec.filesystem("s3", **opts)
    fs.put(str(local), src)

    argv = ["--kind", "tokenflow", "--input", src, "--output", dst, "--preset", "tiny"]
    assert main(argv + ["--storage-options", json.dumps(opts)]) == 0

    loaded = Tokenizer.from_pretrained(dst, storage_options=opts)
    assert loaded.config == tok.config
    ours, theirs = tok.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with fs.open(dst + "/config.json") as fh:
        provenance = json.load(fh)["provenance"]
    assert provenance == {
        "converted_from": src,
        "sha256": hashlib.sha256(local.read_bytes()).hexdigest(),
        "kind": "tokenflow",
    }
