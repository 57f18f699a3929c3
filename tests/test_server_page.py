"""The chat page at GET / in a real headless Chromium (Debian's `chromium`, driven by playwright).

    .venv/bin/python -m pytest -q -m slow tests/test_server_page.py

The page must stream the same greedy answer the API gives, send the whole conversation back each turn,
ask for the key on a server with --api-key, load nothing from outside the server's origin, and log no
console errors. A screenshot of a two-turn chat is left at /tmp/chat_page.png.
"""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from server_helpers import SAMPLES, data_url, image_message, running_server

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path("/tmp/chat_page.png")
IMAGE = SAMPLES / "shapes-1.png"
MAX_TOKENS = 512                 # the page's default, so the API reference answer has the same budget
TIMEOUT_MS = 60_000              # an answer from the demo model on 2 busy cores

# Counts the text changes of assistant bubbles: a streamed answer grows in several steps.
COUNT_DELTAS = """
window.__deltas = 0;
new MutationObserver((records) => {
  for (const r of records) if (r.type === "characterData" && r.target.parentElement.closest(".assistant")) window.__deltas++;
}).observe(document, { subtree: true, characterData: true });
"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the chat-page test needs Debian's browser (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class WatchedPage:
    """A page with its requests, chat request bodies and console errors recorded."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page(viewport={"width": 1000, "height": 720})
        self.requests: list[str] = []
        self.chat_bodies: list[dict] = []
        self.console_errors: list[str] = []
        self.page.on("request", self._on_request)
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda exc: self.console_errors.append(f"uncaught: {exc}"))
        self.page.add_init_script(COUNT_DELTAS)
        self.page.goto(url + "/")

    def _on_request(self, req) -> None:
        self.requests.append(req.url)
        if req.url.endswith("/v1/chat/completions"):
            self.chat_bodies.append(json.loads(req.post_data))

    def status(self, text: str) -> None:
        self.page.wait_for_function(f"document.getElementById('status').textContent === {json.dumps(text)}",
                                    timeout=TIMEOUT_MS)

    def ask(self, text: str, *, with_enter: bool) -> str:
        """Type `text`, send it (Enter or the Send button), wait for the streamed answer; its text."""
        n = self.page.locator(".msg.assistant").count()
        self.page.fill("#prompt", text)
        if with_enter:
            self.page.press("#prompt", "Enter")
        else:
            self.page.click("#send")
        self.page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {n + 1} && "
                                    "!document.querySelector('.streaming')", timeout=TIMEOUT_MS)
        return self.page.locator(".msg.assistant").nth(n).text_content()

    def assert_only_origin(self, origin: str) -> None:
        # data: URLs (the attached image's thumbnail) are not network requests
        outside = [u for u in self.requests if not (u.startswith(origin + "/") or u.startswith("data:"))]
        assert not outside, f"the page reached beyond {origin}: {outside}"


def api_answer(srv, messages: list[dict], headers: dict | None = None) -> str:
    r = httpx.post(srv.url + "/v1/chat/completions", headers=headers, timeout=120,
                   json={"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_page_streams_the_greedy_answer_and_sends_the_whole_conversation(browser):
    with running_server() as srv:
        w = WatchedPage(browser, srv.url)
        page = w.page
        w.status("ready")
        assert page.locator("#model option").all_text_contents() == [srv.settings.model_id]

        page.set_input_files("#file", str(IMAGE))          # attach, then remove: nothing left to send
        page.locator(".thumb img").wait_for()
        page.click(".thumb button")
        assert page.locator(".thumb").count() == 0
        page.set_input_files("#file", str(IMAGE))
        page.locator(".thumb img").wait_for()

        first = w.ask("Describe this picture.", with_enter=True)
        expected = api_answer(srv, [image_message("Describe this picture.", data_url(IMAGE))])
        assert expected and first == expected
        assert page.evaluate("window.__deltas") >= 2, "the answer was not rendered as it streamed"
        assert page.locator(".thumb").count() == 0 and page.input_value("#prompt") == ""
        assert page.locator(".msg.user img").count() == 1

        second = w.ask("What color is the background?", with_enter=False)
        body = w.chat_bodies[-1]
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert body["messages"][0]["content"][1]["image_url"]["url"] == data_url(IMAGE)
        assert body["messages"][1]["content"] == first
        assert body["stream"] is True and body["temperature"] == 0 and body["model"] == srv.settings.model_id
        assert second and second == api_answer(srv, body["messages"])
        assert page.locator(".msg.error").count() == 0
        page.screenshot(path=str(SCREENSHOT))

        page.click("#new-chat")
        assert page.locator(".msg").count() == 0
        w.ask("<b>Hello?</b>", with_enter=True)            # text stays text: no markup from messages
        assert page.locator(".msg.user").text_content() == "<b>Hello?</b>" and page.locator(".msg b").count() == 0
        assert [m["role"] for m in w.chat_bodies[-1]["messages"]] == ["user"]

        # Stop: an answer that never comes (the request is held, unanswered) is aborted by the button
        page.route("**/v1/chat/completions", lambda route: None)
        page.fill("#prompt", "And now?")
        page.press("#prompt", "Enter")
        page.locator("#stop").click()
        page.locator("#send").wait_for()
        assert page.locator(".msg.assistant").last.text_content() == "stopped"
        assert page.locator("#stop").is_hidden() and page.locator(".msg.error").count() == 0

        w.assert_only_origin(srv.url)
        assert w.console_errors == []


def test_page_asks_for_the_api_key_and_then_chats(browser):
    key = "page-test-key"
    with running_server(api_key=key) as srv:
        w = WatchedPage(browser, srv.url)
        page = w.page
        w.status("API key needed")                         # /v1/models said 401
        assert page.locator("#api-key").is_visible()

        page.set_input_files("#file", str(IMAGE))
        page.locator(".thumb img").wait_for()
        page.fill("#prompt", "Describe this picture.")
        page.press("#prompt", "Enter")
        page.locator(".msg.error").wait_for(timeout=TIMEOUT_MS)
        assert "API key" in page.locator(".msg.error").text_content()
        # the failed message is given back, image included, to send again
        assert page.input_value("#prompt") == "Describe this picture." and page.locator(".thumb").count() == 1

        page.fill("#api-key", key)
        page.click("#save-key")
        w.status("ready")
        assert page.evaluate("localStorage.getItem('llava-local.api-key')") == key
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 1 && "
                               "!document.querySelector('.streaming')", timeout=TIMEOUT_MS)
        answer = page.locator(".msg.assistant").text_content()
        expected = api_answer(srv, [image_message("Describe this picture.", data_url(IMAGE))],
                              {"Authorization": f"Bearer {key}"})
        assert answer == expected and page.locator(".msg.error").count() == 1
        assert [m["role"] for m in w.chat_bodies[-1]["messages"]] == ["user"]   # the failed turn was dropped

        w.assert_only_origin(srv.url)
        # Chromium logs each refused fetch ("... status of 401 (Unauthorized)"); nothing else may appear
        assert w.console_errors and all("401" in e for e in w.console_errors), w.console_errors
