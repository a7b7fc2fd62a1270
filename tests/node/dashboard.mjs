// Opens the sidecar's /ui in headless Chromium (Debian's package, driven
// by playwright-core), reads the endpoints and their figures off the page
// once they are moving, clicks "drain" on one endpoint, waits for the page
// to show it drained, saves a screenshot, and prints what it saw as JSON.
//
// usage: node dashboard.mjs ADMIN_ADDR ENDPOINT_TO_DRAIN SCREENSHOT_PATH
import { chromium } from "playwright-core";

const [admin, target, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 700 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`http://${admin}/ui`);
  // Rates need two events; wait for a third, with calls moving.
  await page.waitForFunction(() => Number(document.body.dataset.updates || 0) >= 3, null, { timeout: 15000 });
  const read = () => page.$$eval("tr[data-endpoint]", (rows) => rows.map((r) => ({
    cluster: r.dataset.cluster,
    address: r.dataset.endpoint,
    state: r.querySelector("[data-state]").dataset.state,
    rate: Number(r.querySelector(".rate").textContent),
    share: r.querySelector(".share").textContent,
    in_flight: Number(r.querySelector(".inflight").textContent),
    calls: Number(r.querySelector(".calls").textContent),
    p99: r.querySelector(".p99").textContent,
  })));
  const before = await read();
  const row = page.locator(`tr[data-endpoint="${target}"]`);
  await row.locator('button[data-action="drain"]').click();
  await page.waitForSelector(`tr[data-endpoint="${target}"] [data-state="drained"]`, { timeout: 5000 });
  const status = await page.textContent("#status");
  // Two more events: the drained endpoint's rate falls to 0.
  const seen = Number(await page.evaluate(() => document.body.dataset.updates));
  await page.waitForFunction((n) => Number(document.body.dataset.updates) >= n + 2, seen, { timeout: 10000 });
  const after = await read();
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ before, after, status, errors }));
} finally {
  await browser.close();
}
