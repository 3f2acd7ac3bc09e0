"""multihead.viz on transformers' `outputs.attentions`, and the head view inline in a notebook.

`head_view(out.attentions, tokens)` takes what bertviz's head_view takes and
returns a HeadView; Jupyter shows its `_repr_html_`, an iframe whose srcdoc
is the standalone page that `save` writes, byte for byte. The browser test
puts two such outputs in one page as a notebook does and checks both draw
(chromium, selenium: see tests/test_viz_html.py for when it skips).
"""

from __future__ import annotations

import base64
import html
import json
import re

import numpy as np
import pytest
import torch

from multihead.viz import HeadView, head_stats, head_view, head_view_html, stack_attentions, strongest_targets
from test_viz_html import NASTY, browser  # noqa: F401  (browser: the chromium fixture)

transformers = pytest.importorskip("transformers", reason="the attentions come from a transformers model")

import multihead.hf  # noqa: E402  (registers attn_implementation="multihead")

TOKENS = ["<s>", "▁the", "▁cat", "▁sat", "▁on", "▁the", "▁mat"]  # SentencePiece pieces
SHOWN = ["<s>", " the", " cat", " sat", " on", " the", " mat"]


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama (GQA 4/2) whose weights are large enough that its heads differ."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      initializer_range=0.4)
    return transformers.LlamaModel(config).eval()


def _run(model, impl: str, batch: int = 1):
    model.set_attn_implementation(impl)
    ids = torch.randint(3, 64, (batch, len(TOKENS)), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        return model(input_ids=ids, output_attentions=True).attentions


def _data(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="mh-data">(.*?)</script>', page, re.S)
    assert found, "no data block"
    return json.loads(found.group(1))


def _srcdoc(shown: str) -> str:
    found = re.fullmatch(r'<iframe [^>]*srcdoc="([^"]*)"></iframe>', shown)
    assert found, shown[:300]
    return html.unescape(found.group(1))


# --------------------------------------------------------------------------- transformers' attentions


def test_head_view_takes_a_batch_of_transformers_attentions(llama):
    attentions = _run(llama, "eager", batch=2)
    view = head_view(attentions, TOKENS, batch_index=1, model_name="llama")
    stacked = torch.stack([a[1] for a in attentions])  # L x (B, H, T, T) -> (L, H, T, T)
    assert isinstance(view, HeadView)
    assert view.html == head_view_html(SHOWN, stacked, model_name="llama")
    data = _data(view.html)
    assert (data["L"], data["H"], data["T"], data["k"]) == (2, 4, 7, 7) and data["tokens"] == SHOWN
    keys = np.frombuffer(base64.b64decode(data["edges"]["keys"]), "<u2").reshape(2, 4, 7, 7)  # -> (L, H, T, k)
    values = np.frombuffer(base64.b64decode(data["edges"]["weights"]), "<u2").reshape(2, 4, 7, 7) / 1000  # same
    dense = np.zeros((2, 4, 7, 7))
    np.put_along_axis(dense, keys.astype(np.int64), values, axis=-1)  # (L, H, T, k) -> (L, H, T, T)
    np.testing.assert_allclose(dense, stacked.numpy(), atol=0.5e-3 + 1e-7)  # sequence 1, not 0
    assert (stacked - torch.stack([a[0] for a in attentions])).abs().max() > 0.1  # the two sequences differ


def test_every_viz_function_takes_a_batch_of_one_directly(llama):
    attentions = _run(llama, "eager")
    stacked = stack_attentions(attentions)
    assert stacked.shape == (2, 4, 7, 7) and isinstance(stacked, np.ndarray)
    special = [True] + [False] * 6
    assert head_view_html(SHOWN, attentions) == head_view_html(SHOWN, stacked)
    for field in ("entropy", "mean_distance", "special_share", "previous_share"):
        np.testing.assert_array_equal(getattr(head_stats(attentions, special), field),
                                      getattr(head_stats(stacked, special), field))
    np.testing.assert_array_equal(strongest_targets(attentions, 3), strongest_targets(stacked, 3))
    assert head_view(attentions, TOKENS).html == head_view(stacked, TOKENS).html


def test_multiheads_attentions_in_the_head_view_meet_the_rule(llama):
    """The view of attn_implementation="multihead"'s weights: eager's within the project's rule (hf_cases)."""
    import copy

    import hf_cases as H

    golden_model = copy.deepcopy(llama).double()
    with H.float64_softmax():
        golden = stack_attentions(_run(golden_model, "eager"))
    naive = stack_attentions(_run(llama, "eager"))
    ours = _run(llama, "multihead")
    stacked = stack_attentions(ours)
    err, yardstick = np.abs(stacked - golden).max(), np.abs(naive - golden).max()
    assert H.rule_holds(err, yardstick, H.OUT_FACTOR), f"{err:.3g} vs eager float32 {yardstick:.3g}"
    assert head_view(ours, TOKENS).html == head_view_html(SHOWN, stacked)


def test_what_multihead_hf_options_leave_out_is_named(llama):
    llama.set_attn_implementation("multihead")
    ids = torch.arange(3, 3 + len(TOKENS))[None]  # (1, T)
    with torch.no_grad(), multihead.hf.options(layers=[1]):
        only_layer_1 = llama(input_ids=ids, output_attentions=True).attentions
    with pytest.raises(ValueError, match=r"attentions\[0\] has no heads, shape \(1, 0, 7, 7\): "
                                         r"multihead.hf.options\(layers=...\)"):
        head_view(only_layer_1, TOKENS)
    kept = [a for a in only_layer_1 if a.shape[1]]  # what the message suggests
    assert _data(head_view(kept, TOKENS).html)["L"] == 1
    with torch.no_grad(), multihead.hf.options(rows=-1):
        last_row = llama(input_ids=ids, output_attentions=True).attentions
    with pytest.raises(ValueError, match=r"attentions\[0\] has T = 1 query rows and S = 7 keys"):
        head_view(last_row, TOKENS)


W = torch.softmax(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)), -1)  # (B, H, T, T)


@pytest.mark.parametrize("attentions, kwargs, error, message", [
    ([], {}, ValueError, r"attentions is empty: .*output_attentions=True"),
    ((W, W[:, :2]), {}, ValueError, r"attentions\[1\] has shape \(2, 2, 5, 5\) but attentions\[0\] has \(2, 3, 5, 5\)"),
    ((W[0],), {}, ValueError, r"attentions\[0\] has 3 dims, \(B, H, T, S\) expected, got \(3, 5, 5\)"),
    ((W, W), {}, ValueError, r"attentions holds a batch of B = 2 sequences; pick one: .*batch_index=i"),
    ((W, W), {"batch_index": 2}, ValueError, r"batch_index must be in \[-2, 2\) for attentions of batch size B = 2"),
    ((W, W), {"batch_index": True}, TypeError, r"batch_index must be an int, got bool"),
    ((W, W), {"batch_index": "0"}, TypeError, r"batch_index must be an int, got str"),
    ((W.long(),), {"batch_index": 0}, TypeError, r"attentions\[0\] must hold floating attention weights"),
    ([W, [[0.5]]], {"batch_index": 0}, TypeError, r"attentions\[1\] must be a torch.Tensor or numpy.ndarray"),
    ((W[:1] * 10,), {}, ValueError, r"attentions contains values above 1 .* were scores passed"),
    (W[0], {"batch_index": 0}, TypeError, r"batch_index picks a sequence of transformers'"),  # (H, T, T) as (L, ...)
    ({"layer": W}, {}, TypeError, r"attentions must be a numpy.ndarray or torch.Tensor, got dict"),
    ((W[:1],), {"tokens": list("abcd")}, ValueError, r"tokens has 4 entries but weights has T = 5"),
    ((W[:1],), {"height": 0}, ValueError, r"height must be a positive int \(pixels\) or None, got 0"),
    ((W[:1],), {"height": "tall"}, TypeError, r"height must be an int \(pixels\) or None, got str"),
])
def test_bad_attentions_are_named(attentions, kwargs, error, message):
    tokens = kwargs.pop("tokens", list("abcde"))
    with pytest.raises(error, match=message):
        head_view(attentions, tokens, **kwargs)


# --------------------------------------------------------------------------- the notebook output


def test_notebook_output_is_the_saved_page(tmp_path):
    tokens = [*NASTY, "line\r\nbreak", "Ġcafé"]
    w = torch.softmax(torch.randn(1, 2, len(tokens), len(tokens)) * 3, -1)  # (B, H, T, T)
    view = head_view((w, w), tokens, title='a "quoted" & <b>title</b>\r', focus=3)
    path = view.save(tmp_path / "view.html")
    saved = path.read_bytes().decode("utf-8")
    assert saved == view.html and saved.startswith("<!doctype html>")
    shown = view._repr_html_()
    assert _srcdoc(shown) == saved  # the notebook shows exactly the saved page
    assert 'sandbox="allow-scripts"' in shown and f"height: {view.height}px" in shown
    assert not re.search(r"\ssrc\s*=", shown.split("srcdoc=")[0])  # the iframe loads nothing from elsewhere
    assert "\r" not in shown and "\r" in saved  # a CR survives the notebook's parser as a reference
    with pytest.raises(ValueError, match="path must end in .html"):
        view.save(tmp_path / "view.txt")


def test_the_page_fetches_nothing():
    view = head_view((torch.softmax(torch.randn(1, 2, 6, 6), -1),), list("abcdef"))
    page = view.html
    for attr in re.findall(r'\b(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', page):
        assert attr.startswith(("#", "data:")), f"external reference {attr!r}"
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*stylesheet|@import|url\(", page)
    assert set(re.findall(r"https?://[^\s\"'&]*", page)) <= {"http://www.w3.org/2000/svg"}  # a namespace name
    assert not re.search(r"require\.js|requirejs|cdnjs|jsdelivr|unpkg|jquery|d3\.v", page, re.I)


def test_height_follows_the_tokens():
    short = head_view((torch.softmax(torch.randn(1, 1, 3, 3), -1),), list("abc"))
    long = head_view((torch.softmax(torch.randn(1, 1, 20, 20), -1),), [f"t{i}" for i in range(20)])
    longer = head_view((torch.softmax(torch.randn(1, 1, 200, 200), -1),), [f"t{i}" for i in range(200)])
    assert short.height == 480 and long.height == 260 + 20 * 20 and longer.height == 900
    fixed = head_view((torch.softmax(torch.randn(1, 1, 3, 3), -1),), list("abc"), height=333)
    assert fixed.height == 333 and "height: 333px" in fixed._repr_html_()
    assert repr(fixed) == f"HeadView(html=<{len(fixed.html):,} characters>, height=333)"


def test_notebook_outputs_draw_in_a_browser(browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    views = [head_view((torch.softmax(torch.randn(1, 2, T, T) * 3, -1),), [f"w{i}" for i in range(T)])
             for T in (5, 9)]
    cells = "".join(f'<div class="output_html">{v._repr_html_()}</div>' for v in views)
    notebook = tmp_path / "notebook.html"  # two outputs in one page, as a notebook puts them
    notebook.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{cells}</body></html>",
                        encoding="utf-8")
    browser.get_log("browser")
    browser.get(notebook.as_uri())
    frames = browser.find_elements(By.TAG_NAME, "iframe")
    assert len(frames) == 2
    assert browser.find_elements(By.ID, "mh-root") == []  # nothing of the page leaks into the notebook
    assert browser.execute_script("return getComputedStyle(document.body).margin") == "8px"  # its CSS neither
    for frame, T in zip(frames, (5, 9)):
        browser.switch_to.frame(frame)
        root = browser.find_element(By.ID, "mh-root")
        WebDriverWait(browser, 30).until(lambda d: root.get_attribute("data-ready") == "1")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#mh-left .tok")) == T
        assert len(browser.find_elements(By.CSS_SELECTOR, "#mh-grid canvas")) == 2
        browser.switch_to.default_content()
    assert [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
