"""The OpenAI-compatible API and the chat page of a real stack: a gateway with --http-listen
and a SmolLM2-135M worker, as processes. The `openai` client streams a reply; the chat page
works in headless Chromium (Debian's chromium and chromium-driver), driven by Selenium, and
leaves a screenshot in test-artifacts/."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.serving.conftest import REPO_ROOT, Fleet, one_of_each
from worker.processes import free_port

MODEL = "smol-http"
ARTIFACTS = REPO_ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def stack(redis_server: str, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Fleet, str]]:
    port = free_port()
    with one_of_each(redis_server, smollm2_dir, MODEL, tmp_path_factory.mktemp("openai"),
                     "--max-num-seqs", "4",
                     gateway_flags=("--http-listen", f"127.0.0.1:{port}")) as fleet:
        yield fleet, f"http://127.0.0.1:{port}"


def test_the_openai_client_streams_a_sensible_reply(stack: tuple[Fleet, str]) -> None:
    _, base = stack
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0.0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text, text
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 24
    whole = client.completions.create(model=MODEL, prompt="The capital of France is",
                                      max_tokens=4, temperature=0.0, logprobs=3)
    assert "Paris" in whole.choices[0].text
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and all(len(t) == 3 for t in logprobs.top_logprobs or [])


def _driver() -> object:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, ("Debian's chromium and chromium-driver are missing: "
                                 "`make setup` installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--window-size=1100,800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=ChromeService(driver), options=options)


def test_the_chat_page_streams_shows_timings_and_stops(stack: tuple[Fleet, str]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, base = stack
    browser = _driver()
    try:
        browser.get(f"{base}/")  # type: ignore[attr-defined]
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: Select(b.find_element(By.ID, "model")).options)
        chosen = Select(browser.find_element(By.ID, "model"))  # type: ignore[attr-defined]
        assert chosen.first_selected_option.text == MODEL
        # no key file on this gateway: the page asks for no key
        assert not browser.find_element(By.ID, "keylabel").is_displayed()  # type: ignore[attr-defined]
        temperature = browser.find_element(By.ID, "temperature")  # type: ignore[attr-defined]
        temperature.clear()
        temperature.send_keys("0")
        prompt = browser.find_element(By.ID, "prompt")  # type: ignore[attr-defined]
        prompt.send_keys("What is the capital of France?")
        browser.find_element(By.ID, "send").click()  # type: ignore[attr-defined]
        stats = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, ".stats[data-finish]")))
        reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text  # type: ignore[attr-defined]
        assert "Paris" in reply, reply
        assert "TTFT" in stats.text and "tok/s" in stats.text, stats.text
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "chat-page.png"))  # type: ignore[attr-defined]

        max_tokens = browser.find_element(By.ID, "max_tokens")  # type: ignore[attr-defined]
        max_tokens.clear()
        max_tokens.send_keys("400")
        prompt.send_keys("Write a long story about a lighthouse keeper.")
        browser.find_element(By.ID, "send").click()  # type: ignore[attr-defined]
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
                   and b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text)
        started = time.monotonic()
        browser.find_element(By.ID, "stop").click()  # type: ignore[attr-defined]
        stopped = wait.until(lambda b: [s for s in b.find_elements(
            By.CSS_SELECTOR, ".stats[data-finish]") if s.get_attribute("data-finish")
            == "stopped"])
        assert time.monotonic() - started < 10 and stopped
        assert not browser.find_element(By.ID, "send").get_attribute("disabled")  # type: ignore[attr-defined]
    finally:
        browser.quit()  # type: ignore[attr-defined]
