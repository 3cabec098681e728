// Shared helpers for the browser tests: start a Confab server, launch one
// Chromium per participant, read WebRTC stats from the page's debug hooks.
//
// Every wait here is bounded; callers still set an overall test timeout.

import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { chromium } from 'playwright-core';

export { sleep };

/** Resolves with `promise`'s outcome, or with `fallback` after `ms` (the timer never outlives it). */
export async function within(promise, ms, fallback = undefined) {
  let timer;
  const timeout = new Promise((resolve) => { timer = setTimeout(() => resolve(fallback), ms); });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export const repoRoot = path.resolve(fileURLToPath(new URL('../..', import.meta.url)));
export const outputDir = path.join(repoRoot, 'test-output', 'browser');

/** Debian's Chromium; Playwright's own browser downloads are not used. */
export const chromiumPath = process.env.CONFAB_CHROMIUM ?? '/usr/bin/chromium';

export const chromiumArgs = Object.freeze([
  '--no-sandbox',
  '--headless=new',
  '--disable-gpu',
  '--use-fake-ui-for-media-stream',
  '--use-fake-device-for-media-stream',
  '--allow-loopback-in-peer-connection',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  '--autoplay-policy=no-user-gesture-required',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
]);

/** Path of the server binary: $CONFAB_BIN, else target/debug/confab (relative to the repo root). */
export function serverBinary() {
  return path.resolve(repoRoot, process.env.CONFAB_BIN ?? 'target/debug/confab');
}

const liveServers = new Set();
process.on('exit', () => {
  for (const child of liveServers) child.kill('SIGKILL');
});

/**
 * Starts `confab serve --listen 127.0.0.1:0 --media-port 0 --turn-port 0 ...args`
 * and waits for the URL it prints on stdout (and the UDP media and STUN/TURN
 * addresses it prints next).
 * @returns {Promise<{url: string, port: number, mediaPort: number|null, turnPort: number|null,
 *   child: import('node:child_process').ChildProcess, output: () => string, stop: () => Promise<void>}>}
 */
export async function startServer({ args = [], env = {}, timeoutMs = 15_000, listen = '127.0.0.1:0' } = {}) {
  const bin = serverBinary();
  if (!existsSync(bin)) {
    throw new Error(`server binary not found at ${bin} (build it with \`cargo build --bin confab\` or set CONFAB_BIN)`);
  }
  const child = spawn(bin, ['serve', '--listen', listen, '--media-port', '0', '--turn-port', '0', ...args], {
    cwd: repoRoot,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  liveServers.add(child);

  let output = '';
  const MAX_OUTPUT = 256 * 1024;
  const append = (chunk) => {
    output += chunk;
    if (output.length > MAX_OUTPUT) output = output.slice(-MAX_OUTPUT);
  };
  let stdout = '';
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', append);

  const exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => {
      liveServers.delete(child);
      resolve({ code, signal });
    });
  });

  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    const done = await within(exited.then(() => true), 5_000, false);
    if (!done) {
      child.kill('SIGKILL');
      await within(exited, 2_000);
    }
  };

  // `Media (UDP) on 127.0.0.1:54063.`: the SFU's one UDP port.
  const mediaPortIn = (text) => {
    const match = /Media \(UDP\) on \S+?:(\d+)/.exec(text);
    return match ? Number(match[1]) : null;
  };
  // `STUN/TURN (UDP) on 127.0.0.1:3478.`: the embedded TURN server, printed
  // right after the media line unless disabled.
  const turnPortIn = (text) => {
    const match = /STUN\/TURN \(UDP\) on \S+?:(\d+)/.exec(text);
    return match ? Number(match[1]) : null;
  };
  try {
    const url = await new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`server printed no URL within ${timeoutMs} ms`)),
        timeoutMs,
      );
      let urlSeen = null;
      let graceTimer = null;
      const done = (value) => {
        clearTimeout(timer);
        clearTimeout(graceTimer);
        resolve(value);
      };
      child.stdout.on('data', (chunk) => {
        append(chunk);
        stdout += chunk;
        const match = /http:\/\/\S+/.exec(stdout);
        if (match && !urlSeen) {
          urlSeen = match[0];
          // The media line follows the URL; a server without one is not waited for long.
          graceTimer = setTimeout(() => done(urlSeen), 2_000);
        }
        if (urlSeen && mediaPortIn(stdout) !== null && (turnPortIn(stdout) !== null || args.includes('--no-turn'))) {
          done(urlSeen);
        }
      });
      child.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`server exited before printing its URL (code ${code}, signal ${signal})`));
      });
    });
    const parsed = new URL(url);
    return {
      url: parsed.origin,
      port: Number(parsed.port),
      mediaPort: mediaPortIn(stdout),
      turnPort: turnPortIn(stdout),
      child,
      /** Resolves with `{ code, signal }` when the process has exited. */
      exited,
      output: () => output,
      stop,
    };
  } catch (err) {
    await stop();
    err.message += `\n--- server output ---\n${output}`;
    throw err;
  }
}

/**
 * Launches one Chromium process with a fresh profile and returns its page.
 * Console messages and page errors are collected in `logs`.
 */
export async function launchBrowser(label, { args = [], viewport = { width: 1280, height: 720 } } = {}) {
  const userDataDir = await mkdtemp(path.join(tmpdir(), `confab-${label}-`));
  let context;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: chromiumPath,
      headless: true,
      args: [...chromiumArgs, ...args],
      viewport,
      timeout: 30_000,
    });
  } catch (err) {
    await rm(userDataDir, { recursive: true, force: true });
    throw err;
  }
  const page = context.pages()[0] ?? (await context.newPage());
  const logs = [];
  page.on('console', (msg) => logs.push(`[${label}] ${msg.type()}: ${msg.text()}`));
  page.on('pageerror', (err) => logs.push(`[${label}] pageerror: ${err.message}`));
  let closed = false;
  return {
    label,
    context,
    page,
    logs,
    async close() {
      if (closed) return;
      closed = true;
      await within(context.close().catch(() => {}), 10_000);
      await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
    },
  };
}

/**
 * Calls `fn` every `intervalMs` until it returns a truthy value, and returns
 * that value; throws after `timeoutMs` with `what` and the last value seen.
 */
export async function pollUntil(fn, { timeoutMs = 10_000, intervalMs = 100, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  let lastError;
  while (Date.now() < deadline) {
    try {
      last = await fn();
      if (last) return last;
    } catch (err) {
      lastError = err;
    }
    await sleep(intervalMs);
  }
  const detail = lastError ? `; last error: ${lastError.message}` : `; last value: ${JSON.stringify(last)}`;
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${detail}`);
}

/** The page's client state (window.confab.state()). */
export function clientState(page) {
  return page.evaluate(() => window.confab?.state() ?? null);
}

/**
 * A summary of one of the page's RTCPeerConnections: inbound video/audio
 * (summed, and per video stream) and the selected candidate pair with both
 * candidates. `leg`: 'direct' (window.confab.pc(), the default) or 'server'
 * (window.confab.serverPc()). Null when there is no such peer connection.
 */
export function rtcSummary(page, { leg = 'direct' } = {}) {
  return page.evaluate(async (leg) => {
    const pc = leg === 'server' ? window.confab?.serverPc() : window.confab?.pc();
    if (!pc) return null;
    const report = await pc.getStats();
    const now = performance.now();
    const stats = [...report.values()];
    const byId = new Map(stats.map((s) => [s.id, s]));
    const inbound = (kind) => {
      const streams = stats.filter((s) => s.type === 'inbound-rtp' && s.kind === kind);
      if (!streams.length) return null;
      return {
        framesDecoded: streams.reduce((n, s) => n + (s.framesDecoded ?? 0), 0),
        packetsReceived: streams.reduce((n, s) => n + (s.packetsReceived ?? 0), 0),
        bytesReceived: streams.reduce((n, s) => n + (s.bytesReceived ?? 0), 0),
        frameWidth: streams[0].frameWidth ?? null,
        frameHeight: streams[0].frameHeight ?? null,
      };
    };
    const candidate = (id) => {
      const c = byId.get(id);
      if (!c) return null;
      return {
        address: c.address ?? c.ip ?? null,
        port: c.port,
        protocol: c.protocol,
        candidateType: c.candidateType,
        url: c.url ?? null,
        relayProtocol: c.relayProtocol ?? null,
      };
    };
    const transport = stats.find((s) => s.type === 'transport' && s.selectedCandidatePairId);
    const pair = transport
      ? byId.get(transport.selectedCandidatePairId)
      : stats.find((s) => s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded');
    const videoStreams = stats
      .filter((s) => s.type === 'inbound-rtp' && s.kind === 'video')
      .map((s) => ({
        trackIdentifier: s.trackIdentifier ?? null,
        mid: s.mid ?? null,
        framesDecoded: s.framesDecoded ?? 0,
        packetsReceived: s.packetsReceived ?? 0,
      }));
    return {
      now,
      connectionState: pc.connectionState,
      iceConnectionState: pc.iceConnectionState,
      video: inbound('video'),
      audio: inbound('audio'),
      videoStreams,
      selectedPair: pair
        ? {
            state: pair.state,
            nominated: Boolean(pair.nominated),
            local: candidate(pair.localCandidateId),
            remote: candidate(pair.remoteCandidateId),
          }
        : null,
    };
  }, leg);
}

/**
 * Polls (in the page, every `intervalMs`) until the first remote video frame
 * is decoded on `leg` ('direct' or 'server') and returns the page time of that
 * moment, in ms since navigation start. Null if none is decoded within `timeoutMs`.
 */
export function firstRemoteFrameTime(page, { timeoutMs = 30_000, intervalMs = 50, leg = 'direct' } = {}) {
  return page.evaluate(async ({ timeoutMs, intervalMs, leg }) => {
    const deadline = performance.now() + timeoutMs;
    while (performance.now() < deadline) {
      const pc = leg === 'server' ? window.confab?.serverPc() : window.confab?.pc();
      if (pc && pc.connectionState !== 'closed') {
        const report = await pc.getStats();
        for (const s of report.values()) {
          if (s.type === 'inbound-rtp' && s.kind === 'video' && s.framesDecoded > 0) {
            return Math.round(performance.now());
          }
        }
      }
      await new Promise((resolve) => setTimeout(resolve, intervalMs));
    }
    return null;
  }, { timeoutMs, intervalMs, leg });
}

/** Opens the client at `url` and waits until it has joined (window.confab.state().joined). */
export async function joinCall(page, url, { timeoutMs = 10_000 } = {}) {
  await page.goto(url, { timeout: timeoutMs });
  return pollUntil(async () => {
    const state = await clientState(page);
    return state?.joined ? state : null;
  }, { timeoutMs, what: `the client at ${url} to join` });
}

/** Waits until the media-path badge shows `text`. */
export function waitForBadge(page, text, { timeoutMs = 10_000 } = {}) {
  return pollUntil(async () => {
    const value = (await pathBadgeText(page))?.trim();
    return value === text ? value : null;
  }, { timeoutMs, what: `the path badge to say "${text}"` });
}

/** Text of the media-path badge. */
export function pathBadgeText(page) {
  return page.locator('#path-label').textContent();
}

/** Saves a PNG of the page under test-output/browser/. */
export async function screenshot(page, fileName) {
  await mkdir(outputDir, { recursive: true });
  const file = path.join(outputDir, fileName);
  await page.screenshot({ path: file, timeout: 10_000 });
  return file;
}

/** A room id unlikely to collide with another test's. */
export function randomRoom(prefix = 'room') {
  return `${prefix}-${Math.random().toString(36).slice(2, 10)}`;
}

/**
 * A call's fixtures: a server started with `server` (startServer's options)
 * and one browser per name, both stopped after the test `t`; a new room
 * named after `prefix`. `urlFor(name)` is a member's page (with `query`
 * appended, e.g. '&relay=1'); `dumpLogs()` prints every browser's console
 * and the server's output. `browserArgs(name)` adds Chromium flags for one
 * member (its fake camera or microphone, say).
 */
export async function setUpCall(t, {
  names = ['alice', 'bob'], prefix, server: serverOptions, query = '', browserArgs = () => [],
} = {}) {
  const server = await startServer(serverOptions);
  t.after(() => server.stop());
  const browsers = [];
  t.after(() => Promise.all(browsers.map((b) => b.close())));
  browsers.push(...(await Promise.all(names.map((name) => launchBrowser(name, { args: browserArgs(name) })))));
  const room = randomRoom(prefix);
  const urlFor = (name) => `${server.url}/?room=${room}&name=${name}${query}`;
  const dumpLogs = () => {
    for (const b of browsers) console.log(b.logs.join('\n'));
    console.log(`--- server output ---\n${server.output()}`);
  };
  return { server, browsers, room, urlFor, dumpLogs };
}

/** Saves each browser's page as `<prefix>-<label>.png`; a failed screenshot is logged, not thrown. */
export async function screenshotAll(browsers, prefix) {
  for (const { label, page } of browsers) {
    await screenshot(page, `${prefix}-${label}.png`)
      .catch((err) => console.log(`screenshot of ${label} failed: ${err.message}`));
  }
}
