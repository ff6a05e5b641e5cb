"""Few-row matmuls on packed weight panels (adaptive/panel_matmul.h): the product BLAS computes, the
same bits for a row alone or among others, and never a stale copy of a weight written in place."""

import pytest
import torch

from adaptive import Runtime, native_layers
from adaptive.exits import ShortlistHead

from conftest import make_model, random_prompt


@pytest.fixture(scope="module")
def ext():
    if native_layers.extension() is None:
        pytest.skip(native_layers.status())
    return native_layers.extension()


@pytest.mark.parametrize("K,N", [(64, 96), (192, 576), (512, 192), (40, 37), (192, 8192)])
def test_panels_compute_the_matmul_and_a_row_alone_gets_the_same_bits(ext, K, N):
    g = torch.Generator().manual_seed(K + N)
    wt = torch.randn(K, N, generator=g)
    packed = ext.PackedWeight(wt)
    x = torch.randn(ext.SMALL_ROWS, K, generator=g)
    bias, residual = torch.randn(N, generator=g), torch.randn(ext.SMALL_ROWS, N, generator=g)
    for rows in (1, 2, 5, 9, 12, 13, ext.SMALL_ROWS):
        out = packed.mm(x[:rows], bias, residual[:rows])
        expected = torch.addmm(bias.double(), x[:rows].double(), wt.double()) + residual[:rows].double()
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
        for i in (0, rows - 1):  # a verification row equals the same position decoded alone
            assert torch.equal(packed.mm(x[i:i + 1], bias, residual[i:i + 1])[0], out[i])
    narrow = packed.mm(x[:3], None, None, N - 5)  # the first columns only (a shortlist head's used part)
    assert narrow.shape == (3, N - 5) and torch.equal(narrow, packed.mm(x[:3])[:, :N - 5])


def test_panels_use_the_threads_they_are_given_and_keep_their_bits(ext):
    """The extension is built with OpenMP (at::parallel_for runs serially without it) and each output
    column is still one thread's whole sum: 1 and 2 threads give the same bits."""
    import platform
    if platform.system() == "Linux":
        assert "-fopenmp" in native_layers._compile_flags()
    g = torch.Generator().manual_seed(5)
    wt, x = torch.randn(192, 8192, generator=g), torch.randn(8, 192, generator=g)
    packed = ext.PackedWeight(wt)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = packed.mm(x)
        torch.set_num_threads(2)
        two = packed.mm(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_panels_decline_what_they_do_not_serve(ext):
    wt = torch.randn(32, 48)
    packed = ext.PackedWeight(wt)
    assert packed.mm(torch.randn(ext.SMALL_ROWS + 1, 32)) is None  # many rows: BLAS
    assert packed.mm(torch.randn(2, 32, dtype=torch.float64)) is None
    assert packed.mm(torch.randn(2, 64)[:, ::2]) is None  # a strided row
    assert packed.mm(torch.randn(2, 32, requires_grad=True)) is None  # autograd needs the graph
    x = torch.randn(2, 32)
    assert packed.mm(x) is not None
    with torch.no_grad():
        wt[3, 5] += 1.0  # written in place: the panels are stale from now on
    assert packed.mm(x) is None
    packed.repack(0, 48)
    torch.testing.assert_close(packed.mm(x), x @ wt, rtol=1e-5, atol=1e-5)


def test_a_model_edited_in_place_after_its_first_request_decodes_with_the_edit(ext):
    """Panels are packed on first use; a weight changed afterwards (tests and tools scale layers in
    place) must not be read from the old copy: the request after the edit decodes as a fresh runtime."""
    hf = make_model("llama")
    rt = Runtime.from_model(hf)
    prompt = random_prompt(8, seed=3)
    before = rt.generate(prompt, max_new_tokens=12).token_ids
    assert any(rt.model.packed_projections())
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.down_proj.weight.mul_(-3.0)
        hf.lm_head.weight.mul_(5.0)
    after = rt.generate(prompt, max_new_tokens=12).token_ids
    assert after == Runtime.from_model(hf).generate(prompt, max_new_tokens=12).token_ids
    assert after != before


def test_a_growing_shortlist_head_keeps_its_panels_in_step(ext):
    rt = Runtime.from_model(make_model("llama"))
    head = ShortlistHead(rt.heads, torch.arange(0, 40), spare=4)
    h = torch.randn(1, 3, rt.spec.hidden_size)
    with torch.inference_mode():
        head.add([77, 80, 81, 82, 83, 85])  # past the spare columns: a new buffer, packed again
        head.add([91])
        assert head.panels is not None and head.size == 47
        logits = head.rows_logits(h, rt.spec.num_layers)
        x = rt.model.final_norm(h).view(3, -1)
        assert head.panels.mm(x, None, None, head.size) is not None  # still served from the panels
    torch.testing.assert_close(logits, x @ rt.model.w.lm_head[head.ids].T, rtol=1e-5, atol=1e-5)


def test_the_build_is_named_for_its_sources_and_this_cpu(monkeypatch):
    name = native_layers._build_name()
    assert name.startswith("adaptive_native_layers_") and name == native_layers._NAME
    monkeypatch.setattr(native_layers, "_cpu_tag", lambda: "flags : another machine")
    assert native_layers._build_name() != name
