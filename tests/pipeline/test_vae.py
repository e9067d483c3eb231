"""Streaming VAE: chunk by chunk with a persistent causal cache equals one call over everything."""

import torch

from pipeline.models.loader import load_models
from tests.conftest import tiny_config


def test_streaming_decode_equals_one_call_decode():
    models = load_models(tiny_config(dtype="float64"))
    vae = models.vae
    latents = torch.randn(1, 16, 7, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whole = vae.decode_all(latents)
    stream = vae.new_stream()
    parts = [vae.decode(stream, latents[:, :, i : i + n]) for i, n in ((0, 1), (1, 3), (4, 1), (5, 2))]
    streamed = torch.cat(parts, dim=2)
    assert streamed.shape == whole.shape == (1, 3, 1 + 4 * 6, 32, 32)
    assert torch.allclose(streamed, whole, atol=1e-12, rtol=0)
    # without the persistent cache each chunk restarts: the seam is visible
    restarted = torch.cat([vae.decode(vae.new_stream(), latents[:, :, i : i + 1]) for i in range(7)], dim=2)
    assert restarted.shape[2] < whole.shape[2]


def test_streaming_encode_equals_one_call_encode():
    models = load_models(tiny_config(dtype="float64"))
    vae = models.vae
    video = torch.rand(1, 3, 1 + 4 * 4, 32, 32, dtype=torch.float64) * 2 - 1
    whole = vae.vae.encode(video).latent_dist.mode()
    mean, std = vae._norm(whole)
    whole = (whole - mean) / std
    stream = vae.new_stream()
    parts = [vae.encode(stream, video[:, :, a:b]) for a, b in ((0, 1), (1, 9), (9, 17))]
    assert torch.allclose(torch.cat(parts, dim=2), whole, atol=1e-12, rtol=0)


def test_the_onednn_conv3d_route_computes_what_torch_s_own_does():
    """Every Conv3d of the VAE is routed through oneDNN on a CPU (torch's batch-of-one path is 4x slower);
    streaming tests compare the VAE with itself, so the route is pinned against F.conv3d here."""
    from pipeline.models.vae import _mkldnn_conv3d

    g = torch.Generator().manual_seed(0)
    cases = [
        (torch.nn.Conv3d(4, 6, 3), (1, 4, 3, 8, 8)),
        (torch.nn.Conv3d(4, 6, 3, padding=(0, 1, 1)), (2, 4, 3, 8, 8)),
        (torch.nn.Conv3d(4, 8, (3, 1, 1), stride=(1, 2, 2)), (1, 4, 5, 8, 8)),
        (torch.nn.Conv3d(6, 6, 1, groups=3), (1, 6, 2, 5, 7)),
    ]
    for conv, shape in cases:
        x = torch.randn(*shape, generator=g)
        want = torch.nn.functional.conv3d(
            x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
        )
        got = _mkldnn_conv3d(conv, x, conv.weight, conv.bias)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), conv
    x64 = torch.randn(1, 4, 3, 8, 8, dtype=torch.float64, generator=g)  # not float32: torch's own path
    conv = cases[0][0].double()
    assert torch.equal(_mkldnn_conv3d(conv, x64, conv.weight, conv.bias), conv(x64))
