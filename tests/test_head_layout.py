"""The LM head for several positions may run as W @ x.T on the (V, d) rows: the same logits."""

import pytest
import torch

from adaptive import Runtime

from conftest import make_model


@pytest.mark.parametrize("family, has_rows", [("smollm", True), ("gpt2", True), ("llama", False)])
def test_the_head_for_several_rows_may_use_the_rows_layout_with_the_same_logits(family, has_rows):
    """Tied models have the head's (V, d) rows for free (the embedding); an untied head that the model
    copies into its decode layout is not kept twice. Either layout gives the same logits."""
    from adaptive.host_costs import choose_head_layout
    rt = Runtime.from_model(make_model(family), share_weights=False)
    model = rt.model
    assert (model._head_rows is not None) == has_rows
    h = torch.randn(1, 5, rt.spec.hidden_size)
    with torch.inference_mode():
        default, one_row = model.head(h), model.head(h[:, :1])
        chosen = choose_head_layout(model)
        assert chosen == model.head_rows_from and (chosen is None or 2 <= chosen <= 8)
        if not has_rows:
            assert chosen is None
            return
        model.head_rows_from = 2
        by_rows = model.head(h)
        assert by_rows.shape == default.shape and by_rows.is_contiguous()
        assert torch.allclose(by_rows, default, atol=1e-5)
        assert torch.equal(model.head(h[:, :1]), one_row)  # one row keeps the decode layout
