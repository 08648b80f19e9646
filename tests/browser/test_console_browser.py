"""The web console in a real browser (headless Chromium): sign in, look up a request, download a statement, sign
out, a form without its CSRF token, and the keyboard. Each page's screenshot is saved (docs/images/console-*.png and
$LEDGER_TEST_ARTIFACTS)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from typing import Any

import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser.conftest import Browser
from tests.console_support import a_reconciliation_run, a_settled_request
from tests.support import LedgerClient

pytestmark = pytest.mark.browser

InBrowser = Callable[[Callable[[Browser], Any]], Any]

UNLABELLED = """
return Array.from(document.querySelectorAll('input, select, textarea'))
  .filter(e => !['hidden', 'submit', 'button', 'reset'].includes(e.type))
  .filter(e => e.labels.length === 0 && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby'))
  .map(e => e.outerHTML);
"""


def wait(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 10) -> Any:
    # A page being replaced leaves stale elements behind for a moment: look again.
    ignored = (StaleElementReferenceException, NoSuchElementException)
    return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=ignored).until(condition)


def heading(driver: WebDriver) -> str:
    return str(driver.find_element(By.TAG_NAME, "h1").text)


def on_page(title: str) -> Callable[[WebDriver], bool]:
    def check(driver: WebDriver) -> bool:
        found = driver.find_elements(By.TAG_NAME, "h1")
        return bool(found) and found[0].text == title

    return check


def no_unlabelled_inputs(driver: WebDriver) -> None:
    assert driver.execute_script(UNLABELLED) == [], driver.current_url


def sign_in(b: Browser, key: str) -> None:
    b.open("/console")
    wait(b.driver, on_page("Sign in"))  # no session: sent to the sign-in form
    field = b.driver.find_element(By.ID, "api_key")
    field.send_keys(key)
    field.send_keys(Keys.ENTER)
    wait(b.driver, on_page("Overview"))


async def test_sign_in_refuses_a_wrong_key_and_admits_an_auditor(ledger: LedgerClient, in_browser: InBrowser) -> None:
    await a_settled_request(ledger)
    auditor = ledger.keys["auditor"]
    wrong = "lsk_this-is-not-a-key-of-this-ledger"

    def scenario(b: Browser) -> None:
        driver = b.driver
        b.open("/console")
        wait(driver, on_page("Sign in"))
        assert driver.current_url.endswith("/console/sign-in")
        no_unlabelled_inputs(driver)
        b.screenshot("sign-in")
        field = driver.find_element(By.ID, "api_key")
        assert field.get_attribute("type") == "password"
        field.send_keys(wrong)
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        wait(driver, lambda d: d.find_elements(By.ID, "sign-in-error"))
        assert "was not accepted" in driver.find_element(By.ID, "sign-in-error").text
        assert wrong not in driver.page_source
        assert driver.find_element(By.ID, "api_key").get_attribute("value") == ""
        assert "key" not in driver.current_url.split("/console/")[-1]  # the key never goes into a URL
        sign_in(b, auditor)
        assert auditor not in driver.page_source
        assert all(auditor not in str(c["value"]) for c in driver.get_cookies())
        assert "test auditor" in driver.page_source
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg rect.bar")) == 30
        no_unlabelled_inputs(driver)
        b.screenshot("overview")

    await in_browser(scenario)


async def test_look_up_a_request(ledger: LedgerClient, in_browser: InBrowser) -> None:
    request_id = await a_settled_request(ledger)
    auditor = ledger.keys["auditor"]

    def scenario(b: Browser) -> None:
        driver = b.driver
        sign_in(b, auditor)
        driver.find_element(By.LINK_TEXT, "Request lookup").click()
        wait(driver, on_page("Request lookup"))
        no_unlabelled_inputs(driver)
        field = driver.find_element(By.ID, "request_id")
        field.send_keys("no-such-request")
        field.send_keys(Keys.ENTER)
        wait(driver, lambda d: "No request with id" in d.page_source)
        field = driver.find_element(By.ID, "request_id")
        field.clear()
        field.send_keys(request_id)
        field.send_keys(Keys.ENTER)
        wait(driver, lambda d: d.find_elements(By.ID, "entries-heading"))
        text = driver.find_element(By.TAG_NAME, "main").text
        assert "settled" in text
        assert "model_ratio" in text
        assert ": hold" in text
        assert ": settle" in text
        assert f"hold:{request_id}" in text
        b.screenshot("request")

    await in_browser(scenario)


async def test_download_a_statement(ledger: LedgerClient, in_browser: InBrowser) -> None:
    await a_settled_request(ledger)
    await a_settled_request(ledger)
    api = (await ledger.get("/v1/accounts/user:7/postings", as_="auditor")).json()["items"]
    auditor = ledger.keys["auditor"]

    def scenario(b: Browser) -> list[dict[str, str]]:
        driver = b.driver
        sign_in(b, auditor)
        driver.find_element(By.LINK_TEXT, "Statements").click()
        wait(driver, on_page("Account statement"))
        no_unlabelled_inputs(driver)
        driver.find_element(By.ID, "address").send_keys("user:7")
        driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
        wait(driver, lambda d: d.find_elements(By.ID, "csv-link"))
        b.screenshot("statement")
        driver.find_element(By.ID, "csv-link").click()
        downloaded = b.wait_for_download(".csv")
        assert downloaded.name == "statement-user_7.csv"
        with downloaded.open(newline="") as file:
            return list(csv.DictReader(file))

    rows = await in_browser(scenario)
    assert [(int(r["entry_id"]), int(r["balance_after"])) for r in rows] == [
        (item["entry_id"], item["balance_after"]) for item in api
    ]


async def test_sign_out_and_a_form_without_its_csrf_token(ledger: LedgerClient, in_browser: InBrowser) -> None:
    auditor = ledger.keys["auditor"]

    def scenario(b: Browser) -> None:
        driver = b.driver
        sign_in(b, auditor)
        # A forged form: the sign-out form without its token is refused, and the session lives on.
        driver.execute_script("document.querySelector('form.sign-out input[name=csrf_token]').remove()")
        driver.find_element(By.CSS_SELECTOR, "form.sign-out button").click()
        wait(driver, on_page("Form refused"))
        b.screenshot("csrf-refused")
        b.open("/console")
        wait(driver, on_page("Overview"))
        driver.find_element(By.CSS_SELECTOR, "form.sign-out button").click()
        wait(driver, on_page("Sign in"))
        b.open("/console")
        wait(driver, on_page("Sign in"))  # signed out: the overview is no longer served

    await in_browser(scenario)


async def test_the_pages_are_usable_with_the_keyboard(ledger: LedgerClient, in_browser: InBrowser) -> None:
    request_id = await a_settled_request(ledger)
    auditor = ledger.keys["auditor"]

    def scenario(b: Browser) -> None:
        driver = b.driver
        sign_in(b, auditor)
        for path in ("/console", "/console/requests", "/console/statement?address=user:7"):
            b.open(path)
            wait(driver, lambda d: d.find_elements(By.TAG_NAME, "h1"))
            body = driver.find_element(By.TAG_NAME, "body")
            body.send_keys(Keys.TAB)
            skip = driver.switch_to.active_element
            assert skip.text == "Skip to main content", path
            assert (skip.get_attribute("href") or "").endswith("#main")
            skip.send_keys(Keys.ENTER)
            assert driver.switch_to.active_element.get_attribute("id") == "main", path
            no_unlabelled_inputs(driver)
        # A lookup by keyboard only: skip to the content, Tab to the field, type, Enter.
        b.open("/console/requests")
        wait(driver, on_page("Request lookup"))
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        driver.switch_to.active_element.send_keys(Keys.ENTER)
        driver.switch_to.active_element.send_keys(Keys.TAB)
        field = driver.switch_to.active_element
        assert field.get_attribute("id") == "request_id"
        field.send_keys(request_id, Keys.ENTER)
        wait(driver, lambda d: d.find_elements(By.ID, "entries-heading"))
        # The focused element is visibly outlined (the stylesheet's focus style).
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        outline = driver.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
        assert outline == "solid"

    await in_browser(scenario)


async def test_review_a_run_and_explain_a_difference(ledger: LedgerClient, in_browser: InBrowser) -> None:
    await a_settled_request(ledger)
    run_id = await a_reconciliation_run(ledger.conn)
    auditor = ledger.keys["auditor"]
    note = "The provider billed a retried call twice; ticket FIN-42"

    def scenario(b: Browser) -> None:
        driver = b.driver
        sign_in(b, auditor)
        driver.find_element(By.LINK_TEXT, "Reconciliation runs").click()
        wait(driver, on_page("Reconciliation runs"))
        no_unlabelled_inputs(driver)
        b.screenshot("runs")
        driver.find_element(By.LINK_TEXT, f"Run #{run_id}").click()
        wait(driver, on_page(f"Reconciliation run #{run_id}"))
        no_unlabelled_inputs(driver)
        # Only the differences: choose the class and filter.
        driver.find_element(By.ID, "class").send_keys("differs")
        driver.find_element(By.CSS_SELECTOR, "main form.inline button").click()
        wait(driver, lambda d: "class=differs" in d.current_url)
        assert driver.find_elements(By.ID, "item-2")
        assert not driver.find_elements(By.ID, "item-1")
        field = driver.find_element(By.ID, "note-2")
        field.send_keys(note)
        driver.find_element(By.CSS_SELECTOR, "#item-2 form.explain button").click()
        wait(driver, lambda d: "explained=2" in d.current_url)
        item = driver.find_element(By.ID, "item-2")
        assert note in item.text
        assert "test auditor" in item.text
        b.screenshot("run")
        driver.find_element(By.LINK_TEXT, "Margin").click()
        wait(driver, on_page("Margin per channel and model"))
        no_unlabelled_inputs(driver)
        assert "gpt-4o" in driver.find_element(By.TAG_NAME, "main").text
        b.screenshot("margin")

    await in_browser(scenario)
