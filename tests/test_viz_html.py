"""multihead.viz.html: the standalone head view, as a file and in a real headless browser.

The browser tests need selenium, Pillow, Debian's chromium and chromedriver
(`apt-get install chromium chromium-driver`). Where one is missing they skip
and say which; with MULTIHEAD_REQUIRE_BROWSER=1 (set by .ci/run) they fail
instead, so that CI cannot pass without having run them.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

from multihead.viz.html import head_view_html, write_head_view
from multihead.viz.stats import head_stats, strongest_targets

SENTENCE = "[CLS] the artist painted the portrait of a woman with a brush . [SEP]".split()
NASTY = ["[CLS]", "</script><script>alert(1)</script>", '"', "<|endoftext|>", "&amp;", "<!--", "a\nb", "", "[SEP]"]


def peaky(L: int, H: int, T: int, seed: int = 0) -> np.ndarray:
    """Softmax of sharp random scores: a few strong keys per row, as trained heads have."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal(size=(L, H, T, T), dtype=np.float32)  # float32 throughout: 6 x 12 x 512² is fast
    scores *= 3.0
    scores[:, 0] += 8 * np.eye(T, k=-1, dtype=np.float32)  # head 0: previous token
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores, out=scores)
    p /= p.sum(-1, keepdims=True)
    return p


def page_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="mh-data">(.*?)</script>', page, re.S)
    assert m, "no data block"
    return json.loads(m.group(1))


def decode(b64: str, dtype, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=dtype).reshape(shape)


# --------------------------------------------------------------------------- structure


def test_page_is_one_file_without_network_references():
    page = head_view_html(SENTENCE, peaky(2, 3, len(SENTENCE)))
    assert page.startswith("<!doctype html>")
    # Nothing fetched: no src/href to another file or host, no CSS url()/@import, no external script.
    for attr in re.findall(r'\b(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', page):
        assert attr.startswith(("#", "data:")), f"external reference {attr!r}"
    assert not re.search(r"url\(|@import|<script[^>]*\bsrc=|<link[^>]*stylesheet", page)
    # The only http:// in the page is the SVG namespace name the script passes to createElementNS.
    assert set(re.findall(r"https?://[^\s\"']*", page)) <= {"http://www.w3.org/2000/svg"}
    assert page.count("<script") == 2 and page.count("</script>") == 2


def test_data_round_trips():
    L, H, T, k = 2, 3, 20, 4
    w = peaky(L, H, T)
    w[1, 2, 5] = 0.0  # a row with ties: 0.25 on four keys, the rest exactly 0
    w[1, 2, 5, [3, 9, 11, 17]] = 0.25
    tokens = [f"t{i}" for i in range(T)]
    special = [i in (0, T - 1) for i in range(T)]
    data = page_data(head_view_html(tokens, w, special=special, max_edges_per_token=k))
    assert (data["L"], data["H"], data["T"], data["k"]) == (L, H, T, k)
    assert data["tokens"] == tokens and data["special"] == special
    keys = decode(data["edges"]["keys"], "<u2", (L, H, T, k))
    weights = decode(data["edges"]["weights"], "<u2", (L, H, T, k)) / data["edges"]["scale"]
    # The k strongest keys of each row, strongest first, ties to the lowest index.
    expected = np.argsort(-w, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(keys, expected)
    np.testing.assert_allclose(weights, np.take_along_axis(w, expected, -1), atol=0.5e-3 + 1e-7)
    np.testing.assert_array_equal(keys[1, 2, 5], [3, 9, 11, 17])
    for q in (0, 5, T - 1):
        np.testing.assert_array_equal(keys[:, :, q, 0], strongest_targets(w, q))
    stats = head_stats(w, special)
    np.testing.assert_allclose(data["stats"]["entropy"], stats.entropy, atol=1e-4)
    np.testing.assert_allclose(data["stats"]["previous_share"], stats.previous_share, atol=1e-4)
    np.testing.assert_allclose(data["stats"]["special_share"], stats.special_share, atol=1e-4)
    np.testing.assert_allclose(data["stats"]["mean_distance"], stats.mean_distance, atol=1e-4)
    assert data["max_entropy"] == pytest.approx(math.log(T))
    # Thumbnails: T <= 64, so one cell per weight, on a square-root scale.
    assert (data["thumbs"]["size"], data["thumbs"]["pool"]) == (T, 1)
    thumbs = decode(data["thumbs"]["data"], np.uint8, (L, H, T, T))
    np.testing.assert_array_equal(thumbs, np.rint(255 * np.sqrt(w)).astype(np.uint8))


def test_long_input_thumbnails_are_max_pooled():
    T = 130  # pool 3 -> 44 cells, the last one padded
    w = np.full((1, 1, T, T), 1.0 / T, dtype=np.float32)
    w[0, 0, 100] = 0.0
    w[0, 0, 100, 7] = 1.0
    data = page_data(head_view_html([str(i) for i in range(T)], w))
    n, pool = data["thumbs"]["size"], data["thumbs"]["pool"]
    assert (n, pool) == (44, 3)
    thumbs = decode(data["thumbs"]["data"], np.uint8, (1, 1, n, n))
    assert thumbs[0, 0, 100 // 3, 7 // 3] == 255  # one sharp link survives the pooling
    assert thumbs[0, 0, 0, 0] == round(255 * math.sqrt(1 / T))


@pytest.mark.parametrize("T, max_edges, k, note", [
    (40, 3, 3, "Showing the 3 strongest links per token of 40"),
    (5, 8, 5, "Showing all 5 links per token"),
    (1, 8, 1, "Showing all 1 link per token"),
])
def test_max_edges_respected_and_said(T, max_edges, k, note):
    L, H = 2, 2
    page = head_view_html([f"w{i}" for i in range(T)], peaky(L, H, T), max_edges_per_token=max_edges)
    data = page_data(page)
    assert data["k"] == k
    assert len(base64.b64decode(data["edges"]["keys"])) == 2 * L * H * T * k
    assert note in page


def test_tokens_and_title_are_escaped():
    w = peaky(1, 2, len(NASTY))
    title = "</title><script>alert('t')</script> __DATA__"
    page = head_view_html(NASTY, w, title=title, model_name="m<1>")
    assert page.count("</script>") == 2  # a token's "</script>" is \u003c/script\u003e inside the JSON
    assert "<script>alert" not in page and "<!--" not in page.split("<body>")[1]
    assert "&lt;/title&gt;&lt;script&gt;" in page and "m&lt;1&gt;" in page
    assert "__DATA__" in page  # the title's placeholder-looking text stays text
    assert page_data(page)["tokens"] == NASTY
    assert page_data(page)["special"] == [True, False, False, True, False, False, False, False, True]


def test_torch_input_gives_the_same_page():
    w = peaky(2, 2, 7)
    tokens = [f"w{i}" for i in range(7)]
    assert head_view_html(tokens, torch.from_numpy(w)) == head_view_html(tokens, w)


def test_write_head_view(tmp_path):
    w = peaky(1, 2, 5)
    tokens = list("abcde")
    out = write_head_view(tmp_path / "view.html", tokens, w, title="t")
    assert out == tmp_path / "view.html"
    assert out.read_text(encoding="utf-8") == head_view_html(tokens, w, title="t")
    with pytest.raises(ValueError, match="path must end in .html"):
        write_head_view(tmp_path / "view.png", tokens, w)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        write_head_view(3, tokens, w)


def test_page_size_for_512_tokens():
    """6 layers x 12 heads x 512 tokens: the links and thumbnails must keep the page within a few MB."""
    T = 512
    page = head_view_html(["[CLS]"] + [f"w{i}" for i in range(T - 2)] + ["[SEP]"], peaky(6, 12, T))
    size = len(page.encode("utf-8"))
    assert 1_000_000 < size < 3_000_000, size
    assert "Showing the 8 strongest links per token of 512" in page


@pytest.mark.parametrize("call, error, words", [
    (lambda w: head_view_html(["a", "b"], w), ValueError, "tokens has 2 entries but weights has T = 3"),
    (lambda w: head_view_html("abc", w), TypeError, "single str"),
    (lambda w: head_view_html(["a", 1, "c"], w), TypeError, "tokens[1] must be a str"),
    (lambda w: head_view_html(["a", "b", "c"], w[0]), ValueError, "weights has 3 dims"),
    (lambda w: head_view_html(["a", "b", "c"], w.astype(int)), TypeError, "floating array"),
    (lambda w: head_view_html(["a", "b", "c"], w, max_edges_per_token=0), ValueError,
     "max_edges_per_token must be positive"),
    (lambda w: head_view_html(["a", "b", "c"], w, max_edges_per_token=2.5), TypeError,
     "max_edges_per_token must be an int"),
    (lambda w: head_view_html(["a", "b", "c"], w, special=[True]), ValueError, "special has 1 entries"),
    (lambda w: head_view_html(["a", "b", "c"], w, title=None), TypeError, "title must be a str"),
    (lambda w: head_view_html(["a", "b", "c"], w, model_name=1), TypeError, "model_name must be a str"),
])
def test_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call(peaky(1, 2, 3))
    assert words in str(info.value)


# --------------------------------------------------------------------------- in a real browser


def _browser_or_skip():
    """(webdriver module, chromium path, chromedriver path), or skip (fail when MULTIHEAD_REQUIRE_BROWSER=1)."""
    missing = []
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
        missing.append("the selenium package (pip install selenium)")
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        missing.append("the Pillow package (pip install pillow), to read screenshots")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        missing.append("a chromium binary on PATH (apt-get install chromium)")
    driver = shutil.which("chromedriver")
    if driver is None:
        missing.append("a chromedriver binary on PATH (apt-get install chromium-driver)")
    if missing:
        reason = "browser test needs " + "; ".join(missing)
        if os.environ.get("MULTIHEAD_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (MULTIHEAD_REQUIRE_BROWSER=1 makes this a failure)")
        pytest.skip(reason)
    return webdriver, chromium, driver


@pytest.fixture(scope="module")
def browser():
    webdriver, chromium, driver_path = _browser_or_skip()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1300,1000", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Both paths given: selenium must not try to download a driver (there is no network).
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _severe(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _open(driver, path, tokens, weights, **kwargs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    write_head_view(path, tokens, weights, **kwargs)
    driver.get_log("browser")  # drop what an earlier page logged
    driver.get(path.as_uri())
    root = driver.find_element(By.ID, "mh-root")
    WebDriverWait(driver, 30).until(lambda d: root.get_attribute("data-ready") == "1")
    return root


def _check_hover(driver, root, query: int, weights):
    """Hover a query token: its links appear as SVG lines and the picture changes; returns the screenshot."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    L, H, T, _ = weights.shape
    assert driver.find_elements(By.CSS_SELECTOR, "#mh-links line") == []
    assert root.get_attribute("data-links") == "0" and root.get_attribute("data-hover") == ""
    assert int(root.get_attribute("data-faint")) > 0  # the faint overview of every head's links is drawn

    token = driver.find_elements(By.CSS_SELECTOR, "#mh-left .tok")[query]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", token)
    ActionChains(driver).move_to_element(driver.find_element(By.ID, "mh-controls")).perform()
    before = driver.get_screenshot_as_png()
    ActionChains(driver).move_to_element(token).perform()

    lines = driver.find_elements(By.CSS_SELECTOR, "#mh-links line")
    assert root.get_attribute("data-hover") == str(query)
    assert 0 < len(lines) <= H * min(8, T)
    assert root.get_attribute("data-links") == str(len(lines))
    assert {line.get_attribute("data-head") for line in lines} == {str(h) for h in range(H)}
    assert "focus" in token.get_attribute("class")
    # The side panel names each head's strongest key for this query (layer 0 is shown first).
    rows = driver.find_elements(By.CSS_SELECTOR, "#mh-focus .frow")
    assert len(rows) == H
    targets = strongest_targets(weights, query)[0]
    for h, row in enumerate(rows):
        assert f"#{targets[h]}" in row.text
    after = driver.get_screenshot_as_png()

    a, b = _pixels(before), _pixels(after)
    assert a.shape == b.shape
    assert (a != b).any(axis=-1).mean() > 0.002, "hovering a token changed nothing on screen"
    return b


def _check_not_blank(pixels: np.ndarray):
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 200, f"only {len(colours)} distinct colours: a blank or broken page"
    assert pixels.std() > 10


def test_browser_short_sentence(browser, tmp_path):
    from selenium.webdriver.common.by import By

    L, H, T = 3, 4, len(SENTENCE)
    w = peaky(L, H, T)
    root = _open(browser, tmp_path / "short.html", SENTENCE, w, model_name="random peaky")
    assert _severe(browser) == []
    assert len(browser.find_elements(By.CSS_SELECTOR, "#mh-left .tok")) == T
    assert len(browser.find_elements(By.CSS_SELECTOR, "#mh-grid canvas")) == L * H
    assert len(browser.find_elements(By.CSS_SELECTOR, "#mh-stats tbody tr")) == H
    shot = _check_hover(browser, root, 3, w)
    _check_not_blank(shot)

    # A thumbnail of the model view selects its layer and only its head.
    thumb = browser.find_element(By.CSS_SELECTOR, "#mh-grid canvas[data-layer='2'][data-head='1']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", thumb)
    thumb.click()
    assert root.get_attribute("data-layer") == "2" and root.get_attribute("data-heads") == "1"
    assert browser.find_element(By.ID, "mh-layer").get_attribute("value") == "2"
    # A head toggle turns it back off; the stats table follows the layer.
    browser.find_element(By.CSS_SELECTOR, "#mh-heads .head-btn[data-head='1']").click()
    assert root.get_attribute("data-heads") == ""
    assert browser.find_element(By.ID, "mh-stats-layer").text == "2"
    assert _severe(browser) == []


def test_browser_nasty_tokens(browser, tmp_path):
    from selenium.webdriver.common.by import By

    w = peaky(1, 2, len(NASTY))
    root = _open(browser, tmp_path / "nasty.html", NASTY, w, title="</script> & <b>")
    assert _severe(browser) == []
    texts = [el.get_attribute("textContent") for el in browser.find_elements(By.CSS_SELECTOR, "#mh-left .tok")]
    assert texts[1] == NASTY[1] and texts[3] == "<|endoftext|>"
    assert browser.find_element(By.TAG_NAME, "h1").text == "</script> & <b>"
    assert root.get_attribute("data-ready") == "1"


@pytest.mark.slow
def test_browser_512_tokens(browser, tmp_path):
    from selenium.webdriver.common.by import By

    L, H, T = 6, 12, 512
    tokens = ["[CLS]"] + [f"w{i}" for i in range(T - 2)] + ["[SEP]"]
    w = peaky(L, H, T)
    root = _open(browser, tmp_path / "long.html", tokens, w, model_name="random 512")
    assert _severe(browser) == []
    assert len(browser.find_elements(By.CSS_SELECTOR, "#mh-right .tok")) == T
    assert "8 strongest links per token of 512" in browser.find_element(By.ID, "mh-note").text
    shot = _check_hover(browser, root, 300, w)
    _check_not_blank(shot)
    assert _severe(browser) == []


def test_page_can_open_on_a_layer_with_a_token_pinned(browser, tmp_path):
    """What `multihead demo` writes: the page opens on the demo's layer with 'brush' pinned."""
    from selenium.webdriver.common.by import By

    L, H, T = 3, 4, len(SENTENCE)
    w = peaky(L, H, T)
    brush = SENTENCE.index("brush")
    root = _open(browser, tmp_path / "pinned.html", SENTENCE, w, layer=2, focus=brush)
    assert _severe(browser) == []
    assert root.get_attribute("data-layer") == "2" and root.get_attribute("data-pinned") == str(brush)
    lines = browser.find_elements(By.CSS_SELECTOR, "#mh-links line")
    assert 0 < len(lines) <= H * 8 and root.get_attribute("data-links") == str(len(lines))
    rows = browser.find_elements(By.CSS_SELECTOR, "#mh-focus .frow")
    targets = strongest_targets(w, brush)[2]  # layer 2's choices are the ones listed
    assert [f"#{targets[h]}" in row.text for h, row in enumerate(rows)] == [True] * H


def test_start_layer_and_focus_are_checked():
    w = peaky(2, 2, len(SENTENCE))
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got 2"):
        head_view_html(SENTENCE, w, layer=2)
    with pytest.raises(ValueError, match=r"focus must be in \[0, 14\), got 14"):
        head_view_html(SENTENCE, w, focus=14)
    with pytest.raises(TypeError, match="focus must be an int"):
        head_view_html(SENTENCE, w, focus="brush")
