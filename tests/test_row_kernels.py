"""The row kernels (adaptive/row_kernels.h): RMSNorm, few-row attention over the cache and SiLU(gate) * up
agree with torch's kernels to rounding, give a query row the same bits alone or among others, and decline
(None) what they do not serve, so the caller falls back to torch."""

import pytest
import torch
import torch.nn.functional as F

from adaptive import native_layers


@pytest.fixture(scope="module")
def ext():
    module = native_layers.extension()
    if module is None:
        pytest.skip(native_layers.status())
    return module


def test_rms_norm_matches_the_reference(ext):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 200, generator=g) * 3, torch.randn(200, generator=g)  # 200: a tail after the lanes
    expected = x * torch.rsqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-5).float() * w
    got = ext.rms_norm(x, w, 1e-5)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    assert torch.equal(ext.rms_norm(x[1, 2:3], w, 1e-5)[0], got[1, 2])  # a row alone: the same bits


def test_silu_mul_matches_the_reference_over_a_wide_range(ext):
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(4, 2 * 70, generator=g) * 20  # up to |120|: exp clamps; 70 leaves a tail
    gate_up[0, :4] = torch.tensor([-200.0, -88.0, 88.0, 200.0])
    got = ext.silu_mul(gate_up)
    expected = (F.silu(gate_up[:, :70].double()) * gate_up[:, 70:].double()).float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-30)


def sdpa_reference(q, keys, values, pos, window, scale):
    """q (1, H, T, hd) at positions [pos, pos + T) over keys (1, Hkv, pos + T, hd) from position 0: (T, H*hd)."""
    T, S = q.shape[2], keys.shape[2]
    q_pos, k_pos = torch.arange(pos, pos + T)[:, None], torch.arange(S)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    out = F.scaled_dot_product_attention(q.double(), keys.double(), values.double(), attn_mask=allowed, scale=scale,
                                         enable_gqa=keys.shape[1] != q.shape[1])
    return out.float().transpose(1, 2).reshape(T, -1)


@pytest.mark.parametrize("heads,kv_heads,hd,window", [(6, 6, 32, None), (4, 2, 16, None), (4, 1, 24, 5), (6, 2, 32, 5)],
                         ids=["mha", "gqa", "mqa-window-tail", "gqa-window"])
def test_attention_matches_sdpa_and_a_row_alone_gets_the_same_bits(ext, heads, kv_heads, hd, window):
    g = torch.Generator().manual_seed(2)
    pos, T, capacity = 37, 6, 64
    cache_k = torch.randn(1, kv_heads, capacity, hd, generator=g) * 2
    cache_v = torch.randn(1, kv_heads, capacity, hd, generator=g)
    q = torch.randn(1, T, heads, hd, generator=g).transpose(1, 2) * 2  # (1, H, T, hd), strided like the layer's
    scale = hd ** -0.5
    key_start = 0 if window is None else pos - window + 1
    keys, values = cache_k[:, :, key_start:pos + T], cache_v[:, :, key_start:pos + T]
    got = ext.attention(q, keys, values, pos, key_start, -1 if window is None else window, scale)
    expected = sdpa_reference(q, cache_k[:, :, :pos + T], cache_v[:, :, :pos + T], pos, window, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for t in range(T):  # each row alone, as a decode step at its position computes it
        start = 0 if window is None else max(0, pos + t - window + 1)
        alone = ext.attention(q[:, :, t:t + 1], cache_k[:, :, start:pos + t + 1], cache_v[:, :, start:pos + t + 1],
                              pos + t, start, -1 if window is None else window, scale)
        assert torch.equal(alone[0], got[t]), t


def test_attention_gives_the_same_bits_on_one_thread_and_on_two(ext):
    """Long enough a context that the (row, head) pairs are shared among threads: the split changes
    nothing, since each pair runs the same instructions on whichever thread takes it."""
    g = torch.Generator().manual_seed(6)
    pos, T, heads, hd = 300, 8, 6, 32
    cache_k, cache_v = torch.randn(1, heads, pos + T, hd, generator=g), torch.randn(1, heads, pos + T, hd, generator=g)
    q = torch.randn(1, T, heads, hd, generator=g).transpose(1, 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.attention(q, cache_k, cache_v, pos, 0, -1, hd ** -0.5)
        torch.set_num_threads(2)
        two = ext.attention(q, cache_k, cache_v, pos, 0, -1, hd ** -0.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(two, sdpa_reference(q, cache_k, cache_v, pos, None, hd ** -0.5), rtol=1e-5, atol=1e-5)


def test_what_the_kernels_decline(ext):
    x, w = torch.randn(2, 8), torch.randn(8)
    assert ext.rms_norm(x.bfloat16(), w.bfloat16(), 1e-5) is None
    assert ext.rms_norm(x.requires_grad_(), w, 1e-5) is None  # autograd records: torch's ops
    assert ext.silu_mul(torch.randn(2, 7)) is None  # no [gate | up] halves
    k = torch.randn(1, 2, 20, 8)
    assert ext.attention(torch.randn(1, 2, 17, 8), k, k, 3, 0, -1, 1.0) is None  # more rows than SMALL_ROWS
    assert ext.attention(torch.randn(2, 2, 1, 8), k.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), 19, 0, -1, 1.0) is None
    assert ext.attention(torch.randn(1, 2, 1, 8), k, k, 3, 0, -1, 1.0) is None  # keys do not end at pos + T
    assert ext.attention(torch.randn(1, 3, 1, 8), k, k, 19, 0, -1, 1.0) is None  # 3 heads over 2 kv heads
    assert ext.attention(torch.randn(1, 2, 1, 8), k, k, 19, 0, -1, 1.0) is not None


def test_greedy_verdict_matches_softmax_and_max(ext):
    g = torch.Generator().manual_seed(3)
    for vocab in (8192, 8193, 7):  # a tail after the lanes, and a row shorter than one vector
        logits = torch.randn(8, vocab, generator=g) * 6
        logits[3] = 0.5  # every element tied: the first wins
        logits[5, vocab // 2:] = logits[5].max() + 1  # a tied maximum after others
        tokens = torch.randint(0, vocab, (8,), generator=g).tolist()
        best, p = ext.greedy_verdict(logits, tokens)
        assert best == logits.max(dim=-1).indices.tolist()
        assert best[3] == 0 and best[5] == vocab // 2
        expected = torch.softmax(logits.double(), dim=-1)[torch.arange(8), tokens]
        torch.testing.assert_close(torch.tensor(p, dtype=torch.float64), expected, rtol=5e-6, atol=1e-30)
    rows = torch.randn(4, 300, generator=g)
    alone = ext.greedy_verdict(rows[2:3], [17])
    assert alone[0][0] == ext.greedy_verdict(rows, [0, 0, 17, 0])[0][2]
    assert alone[1][0] == ext.greedy_verdict(rows, [0, 0, 17, 0])[1][2]  # a row alone: the same bits


def test_greedy_verdict_declines_what_torch_should_judge(ext):
    logits = torch.randn(4, 100)
    for bad in (float("nan"), float("inf"), float("-inf")):
        spoiled = logits.clone()
        spoiled[2, 7] = bad
        assert ext.greedy_verdict(spoiled, [0] * 4) is None
    assert ext.greedy_verdict(logits, [0, 0, 0, 100]) is None  # a token outside the vocabulary
    assert ext.greedy_verdict(logits, [0, 0, 0]) is None  # a token per row
    assert ext.greedy_verdict(logits[:, ::2], [0] * 4) is None  # rows not contiguous
    assert ext.greedy_verdict(logits.double(), [0] * 4) is None
    assert ext.greedy_verdict(torch.randn(17, 10), [0] * 17) is None  # more rows than SMALL_ROWS


def test_greedy_rows_is_the_verdict_on_each_rows_own_argmax(ext):
    """A draft pass's greedy pick and confidence: torch's argmax (first of ties) and max softmax
    probability, with the verdict's bits for the same token, and None where torch should decide."""
    g = torch.Generator().manual_seed(4)
    for vocab in (1280, 1283, 5):
        logits = torch.randn(6, vocab, generator=g) * 6
        logits[1] = -2.0  # every element tied: the first wins
        best, p = ext.greedy_rows(logits)
        assert best == logits.max(dim=-1).indices.tolist() and best[1] == 0
        expected = torch.softmax(logits.double(), dim=-1).max(dim=-1).values
        torch.testing.assert_close(torch.tensor(p, dtype=torch.float64), expected, rtol=5e-6, atol=1e-30)
        assert (best, p) == ext.greedy_verdict(logits, best)
    spoiled = torch.randn(3, 50)
    spoiled[1, 4] = float("nan")
    assert ext.greedy_rows(spoiled) is None
    assert ext.greedy_rows(torch.randn(3, 50)[:, ::2]) is None  # rows not contiguous
    assert ext.greedy_rows(torch.randn(17, 10)) is None  # more rows than SMALL_ROWS
    assert ext.greedy_rows(torch.randn(0, 10)) is None
