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
