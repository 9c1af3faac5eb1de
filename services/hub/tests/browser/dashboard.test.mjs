// The dashboard end to end, in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core): a real hub process with demo devices on a private redis-server, all on
// loopback. Screenshots go to target/browser-artifacts/ (look at them).
//
//   node services/hub/tests/browser/dashboard.test.mjs      (after `cargo build -p hub`)
//   HUB_BIN=target/release/hub node …                      (as scripts/test-all.sh runs it: the
//                                                           2,000-device step prints its time)
//
// Bounded: every wait has a timeout, and the whole run is killed after 3 minutes.

import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, existsSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { chromium } from "playwright-core";

const root = resolve(import.meta.dirname, "../../../..");
const hubBin = process.env.HUB_BIN ?? join(root, "target/debug/hub");
const artifacts = join(root, "target/browser-artifacts");
const secret = "browser-test-secret-of-32-bytes!!!!";
const children = new Set();

const deadline = setTimeout(() => {
  console.error("FAIL: the browser test ran past 3 minutes");
  cleanup();
  process.exit(1);
}, 180_000);

function cleanup() {
  for (const child of children) child.kill("SIGKILL");
}

/** Within this, the fleet cards can only have come from the snapshot: the demo devices of
 * step 6 all publish at once, a second before the page opens, and then not for a minute. */
const SNAPSHOT_BOUND_MS = 15_000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function freePort() {
  return new Promise((ok) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
  });
}

async function until(what, check, timeoutMs = 15_000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

function start(cmd, args, env) {
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (d) => (stderr = (stderr + d).slice(-4000)));
  child.logs = () => stderr;
  children.add(child);
  child.on("exit", () => children.delete(child));
  return child;
}

async function main() {
  assert.ok(existsSync(hubBin), `${hubBin} is missing: cargo build -p hub`);
  rmSync(artifacts, { recursive: true, force: true });
  mkdirSync(artifacts, { recursive: true });
  const dir = mkdtempSync(join(tmpdir(), "dashboard-test-"));
  const socket = join(dir, "redis.sock");
  start("redis-server", ["--port", "0", "--unixsocket", socket, "--unixsocketperm", "700",
    "--dir", dir, "--save", "", "--appendonly", "no"]);
  await until("redis-server", () => existsSync(socket));

  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const hubEnv = {
    HUB_LISTEN: `127.0.0.1:${port}`,
    HUB_AUTH__HS256_SECRET: secret,
    HUB_BROKER__URL: `redis+unix://${socket}`,
    HUB_DEMO__DEVICES: "3",
    HUB_DEMO__INTERVAL: "200ms",
    RUST_LOG: "warn",
  };
  const startHub = async () => {
    const hub = start(hubBin, ["serve"], hubEnv);
    await until("the hub to be ready", async () => {
      try {
        return (await fetch(`${base}/readyz`)).ok;
      } catch {
        return false;
      }
    });
    return hub;
  };
  let hub = await startHub();
  const token = execFileSync(hubBin, ["token", "--sub", "browser", "--role", "viewer", "--ttl", "1h"],
    { env: { ...process.env, ...hubEnv } }).toString().trim();

  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  const errors = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
    page.on("pageerror", (e) => errors.push(String(e)));
    const shot = (name) => page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });
    const testid = (id) => page.locator(`[data-testid="${id}"]`);

    // 1. A bad token is refused with a clear message, and the sign-in form comes back.
    await page.goto(`${base}/?token=not.a.jwt`);
    await testid("auth-error").waitFor({ state: "visible", timeout: 15_000 });
    const refusal = await testid("auth-error").innerText();
    assert.match(refusal, /jwt|token|malformed/i, `refusal says why: ${refusal}`);
    assert.equal(await testid("connection").getAttribute("data-state"), "auth_refused");
    await testid("signin").waitFor({ state: "visible" });
    await shot("1-refused");
    console.log("ok   a bad token is refused with a clear message");

    // 2. Signing in with a pasted token: devices appear as the demo agents publish.
    await testid("token-input").fill(token);
    await testid("signin-submit").click();
    await until("connected", async () =>
      (await testid("connection").getAttribute("data-state")) === "connected");
    await until("three device cards", async () => (await testid("device-card").count()) === 3);
    const hubNode = (await testid("hub-node").innerText()).trim();
    assert.ok(hubNode.length > 0, "the serving hub is shown");
    await until("a message rate", async () => parseFloat(await testid("rate").innerText()) > 0);
    await shot("2-fleet");
    const sparkWidth = await page.locator(".spark").first().evaluate((c) => c.clientWidth);
    assert.ok(sparkWidth >= 150, `a sparkline has room for a trend: ${sparkWidth}px`);
    const presence = await page.locator('[data-testid="device-card"][data-device="demo-01"] [data-testid="presence"]').innerText();
    assert.match(presence, /connected .* via /, `presence on the card: ${presence}`);
    console.log(`ok   signed in; 3 devices live, online in presence; served by ${hubNode}; sparklines ${sparkWidth}px`);

    // 2b. A reading is credited to the agent that published it (`from`), whatever its data says:
    // an agent naming another device in `data.device` paints only its own card.
    const spoofer = execFileSync(hubBin, ["token", "--sub", "pi-spoof", "--role", "agent", "--ttl", "1h"],
      { env: { ...process.env, ...hubEnv } }).toString().trim();
    const agentPage = await browser.newPage();
    await agentPage.goto(`${base}/healthz`);
    const acked = await agentPage.evaluate(async ({ port, token }) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?token=${token}`);
      const frames = [];
      ws.onmessage = (ev) => frames.push(JSON.parse(ev.data));
      const next = async (type) => {
        for (let i = 0; i < 100; i++) {
          const f = frames.find((x) => x.type === type);
          if (f) return f;
          await new Promise((r) => setTimeout(r, 50));
        }
        return null;
      };
      const hello = await next("hello");
      ws.send(JSON.stringify({ type: "publish", seq: hello.last_seq + 1,
        data: { device: "demo-01", sensor: "spoof", metrics: { spoofed: { value: 666, unit: "" } } } }));
      const ack = await next("ack");
      ws.close();
      return ack !== null;
    }, { port, token: spoofer });
    assert.ok(acked, "the spoofing reading was accepted (it is the agent's own)");
    const spoofCard = page.locator('[data-testid="device-card"][data-device="pi-spoof"]');
    await spoofCard.waitFor({ state: "visible", timeout: 15_000 });
    await until("the reading on its publisher's card", async () =>
      (await spoofCard.locator('[data-metric="spoofed"]').count()) === 1);
    const demoCard = page.locator('[data-testid="device-card"][data-device="demo-01"]');
    assert.equal(await demoCard.locator('[data-metric="spoofed"]').count(), 0, "demo-01 is not painted");
    await agentPage.close();
    console.log("ok   a reading is credited to its publisher (from), not to data.device");
    // Its agent closed: presence says offline, and why, at once (not after 60 s of silence).
    await until("pi-spoof offline", async () => (await spoofCard.getAttribute("data-status")) === "offline");
    const gone = await spoofCard.locator('[data-testid="presence"]').innerText();
    assert.match(gone, /offline since .* peer closed/, `the reason on the card: ${gone}`);
    await shot("2c-presence");
    console.log(`ok   presence: the agent's close shows on its card at once ("${gone}")`);

    // 3. A device's detail view: its charts grow without a reload.
    await page.locator('[data-testid="device-card"][data-device="demo-01"]').click();
    await testid("device-detail").waitFor({ state: "visible" });
    assert.equal(await testid("device-detail").getAttribute("data-device"), "demo-01");
    const chart = page.locator('[data-testid="chart"][data-metric="cpu_temp"]');
    await chart.waitFor({ state: "visible" });
    const points = async () => Number(await chart.getAttribute("data-points"));
    const before = await until("points on the chart", async () => (await points()) > 0 && (await points()));
    await until("the chart to grow", async () => (await points()) >= before + 3);
    await shot("3-device");
    console.log("ok   the device chart grows live");

    // 4. The hub restarts (drain, 1012): the page reconnects and resumes with no gap.
    const recoveredBefore = Number(await testid("recovered-count").innerText());
    const pointsBefore = await points();
    hub.kill("SIGTERM");
    await new Promise((r) => hub.once("exit", r));
    await until("the page to notice", async () =>
      (await testid("connection").getAttribute("data-state")) !== "connected", 10_000);
    await shot("4-reconnecting");
    await sleep(1000); // demo readings are lost while no hub runs; history has the rest
    hub = await startHub();
    await until("connected again", async () =>
      (await testid("connection").getAttribute("data-state")) === "connected", 30_000);
    await until("a recovered resume", async () =>
      Number(await testid("recovered-count").innerText()) > recoveredBefore, 15_000);
    await until("the chart to go on", async () => (await points()) >= pointsBefore + 3, 15_000);
    assert.equal(Number(await testid("gap-count").innerText()), 0, "no gap after the restart");
    assert.equal(await chart.getAttribute("data-gaps"), "0");
    await shot("5-recovered");
    console.log("ok   after a hub restart the dashboard reconnects and recovers with no gap");

    // 5. Reload keeps the device view (URL hash) and the session's token.
    await page.reload();
    await testid("device-detail").waitFor({ state: "visible", timeout: 15_000 });
    await until("connected after reload", async () =>
      (await testid("connection").getAttribute("data-state")) === "connected");
    console.log("ok   a reload keeps the view and the session");

    // 6. A fleet of 2,000 devices that publish once a minute: the snapshot shows all of them
    // as soon as the page opens, instead of over the next minute. The time is printed, not
    // asserted against the 2 s target (a shared CI core is no benchmark: docs/benchmarks.md
    // reports it); the bound below only proves the cards came from the snapshot, since live
    // readings alone would take a minute to name every device.
    const bigPort = await freePort();
    const bigBase = `http://127.0.0.1:${bigPort}`;
    const { HUB_BROKER__URL: _redis, ...embedded } = hubEnv; // the embedded broker
    start(hubBin, ["serve"], { ...embedded, HUB_LISTEN: `127.0.0.1:${bigPort}`,
      HUB_DEMO__DEVICES: "2000", HUB_DEMO__INTERVAL: "60s" });
    await until("the big hub", async () => {
      try { return (await fetch(`${bigBase}/readyz`)).ok; } catch { return false; }
    });
    await sleep(1000); // the demo's first readings, then silence for a minute
    const big = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    big.on("pageerror", (e) => errors.push(String(e)));
    const requested = Date.now();
    await big.goto(`${bigBase}/?token=${token}`);
    // Opened: the page is loaded (its scripts run); from here it connects, subscribes, and
    // renders the snapshot.
    const opened = Date.now();
    // Every card with its latest reading (the fleet snapshot) and its connection (presence's).
    const complete = () => big.evaluate(() => [...document.querySelectorAll('[data-testid="device-card"]')]
      .filter((c) => c.querySelector('[data-metric="cpu_temp"]')
        && /^connected /.test(c.querySelector('[data-testid="presence"]').textContent)).length);
    await until("2,000 cards with their readings and presence", async () => (await complete()) === 2000,
      SNAPSHOT_BOUND_MS).catch(async (e) => {
      await big.screenshot({ path: join(artifacts, "6-fleet-2000-failed.png") });
      const shown = await complete();
      const summary = await big.locator('[data-testid="summary"]').innerText();
      throw new Error(`${e.message}: ${shown} complete, "${summary}"`);
    });
    const took = Date.now() - opened;
    await until("all online", async () =>
      /2000 online/.test(await big.locator('[data-testid="summary"]').innerText()), 5_000);
    await big.screenshot({ path: join(artifacts, "6-fleet-2000.png") });
    await big.close();
    console.log(`ok   2,000 devices on the page ${took} ms after it opened (${opened - requested} ms to load it; target 2,000 ms), all online (snapshot + presence)`);

    assert.deepEqual(errors, [], "no uncaught errors in the page");
  } catch (e) {
    console.error("page errors: " + JSON.stringify(errors));
    console.error("hub log tail:\n" + (hub.logs?.() ?? ""));
    throw e;
  } finally {
    await browser.close();
    cleanup();
    rmSync(dir, { recursive: true, force: true });
  }
  console.log(`dashboard browser tests passed; screenshots in ${artifacts}`);
}

main()
  .then(() => {
    clearTimeout(deadline);
    process.exit(0);
  })
  .catch((e) => {
    console.error("FAIL", e);
    cleanup();
    process.exit(1);
  });
