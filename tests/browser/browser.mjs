// Headless Chromium for the browser tests: Debian's package (scripts/browser finds or installs
// it and passes its path in CHROMIUM), driven by puppeteer-core, which never downloads a browser.
import puppeteer from "puppeteer-core";

// Flags that work as root in a container: no sandbox (it needs user namespaces), no GPU, and
// /tmp instead of a small /dev/shm.
export const CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"];

export async function launchChromium() {
  const executablePath = process.env.CHROMIUM;
  if (!executablePath) throw new Error("CHROMIUM is not set (run scripts/browser)");
  return puppeteer.launch({
    executablePath,
    headless: true,
    args: [...CHROMIUM_ARGS, "--window-size=1280,900"],
    defaultViewport: { width: 1280, height: 900 },
    timeout: 60_000,
  });
}
