// `scripts/browser smoke`: the browser alone. Chromium starts, opens about:blank, renders a
// page given as a data: URL, and takes a screenshot into BROWSER_ARTIFACTS.
import path from "node:path";
import { launchChromium } from "./browser.mjs";

const artifacts = process.env.BROWSER_ARTIFACTS ?? ".";
const browser = await launchChromium();
try {
  console.log(`smoke: ${await browser.version()} (${process.env.CHROMIUM})`);
  const page = await browser.newPage();
  await page.goto("about:blank");
  await page.setContent('<h1 id="hello">ackloop smoke</h1>');
  const text = await page.$eval("#hello", (e) => e.textContent);
  if (text !== "ackloop smoke") throw new Error(`the page says ${JSON.stringify(text)}`);
  const file = path.join(artifacts, "smoke.png");
  await page.screenshot({ path: file });
  console.log(`smoke: screenshot in ${file}`);
  console.log("smoke: 1 passed, 0 failed");
} finally {
  await browser.close();
}
