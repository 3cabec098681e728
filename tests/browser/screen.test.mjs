// Screen sharing in real browsers. Alice's fake camera is a 320x240 file
// (--use-file-for-fake-video-capture); her fake screen is Chromium's 1280x720
// capture. When she shares, the others must receive her screen, not her
// camera, on whatever path the room uses: peer-to-peer with Bob, then
// through the server once Carol joins; when she stops, her camera again.
// The frame size decoded at each receiver tells which one arrives.
//
// Run inside a loopback-only network namespace (as root):
//   unshare -n sh -c 'ip link set lo up && node --test tests/browser/'

import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { clientState, joinCall, pollUntil, screenshotAll, setUpCall, waitForBadge } from './harness.mjs';

const CAMERA = { width: 320, height: 240 };

/** A Y4M video of 20 red frames (Chromium loops it as the fake camera). */
function y4m({ width, height }) {
  const header = Buffer.from(`YUV4MPEG2 W${width} H${height} F20:1 Ip A1:1 C420jpeg\n`);
  const frame = Buffer.concat([
    Buffer.from('FRAME\n'),
    Buffer.alloc(width * height, 81), // Y
    Buffer.alloc((width / 2) * (height / 2), 90), // U
    Buffer.alloc((width / 2) * (height / 2), 240), // V: red
  ]);
  return Buffer.concat([header, ...Array(20).fill(frame)]);
}

/**
 * The frame width `page` decodes from member `id`, on the path its tile
 * renders; null until it decodes. Also whether the page marks it as a screen.
 */
function received(page, id) {
  return page.evaluate(async (id) => {
    const state = window.confab.state();
    const member = state.members.find((m) => m.id === id);
    if (!member?.rendered) return null;
    const pc = member.rendered === 'server' ? window.confab.serverPc() : window.confab.pc();
    const trackId = member.tracks[member.rendered].video;
    if (!pc || !trackId) return null;
    const report = await pc.getStats();
    const inbound = [...report.values()].find((s) => s.type === 'inbound-rtp' && s.kind === 'video'
      && s.trackIdentifier === trackId);
    const tile = document.querySelector(`.tile[data-id="${id}"]`);
    return {
      path: member.rendered,
      width: inbound?.frameWidth ?? null,
      screen: member.screen,
      tileScreen: tile?.dataset.screen === 'true',
    };
  }, id);
}

test('a shared screen replaces the camera at every receiver, on both paths', { timeout: 120_000 }, async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'confab-video-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const camera = path.join(dir, 'camera.y4m');
  await writeFile(camera, y4m(CAMERA));

  const { browsers, urlFor, dumpLogs } = await setUpCall(t, {
    names: ['alice', 'bob', 'carol'],
    prefix: 'screen',
    browserArgs: (name) => (name === 'alice' ? [`--use-file-for-fake-video-capture=${camera}`] : []),
  });
  const [alice, bob, carol] = browsers;

  /** Waits until every receiver decodes alice's video at a width `ok` accepts, on `path`. */
  const expect = async (receivers, aliceId, path, screen, ok, what) => {
    const started = Date.now();
    const seen = await pollUntil(async () => {
      const all = await Promise.all(receivers.map((b) => received(b.page, aliceId)));
      return all.every((r) => r && r.path === path && r.screen === screen && r.tileScreen === screen && ok(r.width))
        ? all : null;
    }, { timeoutMs: 20_000, intervalMs: 200, what });
    console.log(`${what}: ${JSON.stringify(seen)} after ${Date.now() - started} ms`);
  };

  try {
    const aliceState = await joinCall(alice.page, urlFor('alice'));
    const aliceId = aliceState.participantId;
    await joinCall(bob.page, urlFor('bob'));
    await waitForBadge(bob.page, 'peer-to-peer', { timeoutMs: 20_000 });
    await expect([bob], aliceId, 'direct', false, (w) => w === CAMERA.width, "bob sees alice's camera directly");

    // Sharing: the button is pressed, Bob decodes the screen.
    await alice.page.click('#screen-btn');
    await pollUntil(async () => (await alice.page.getAttribute('#screen-btn', 'aria-pressed')) === 'true',
      { timeoutMs: 5_000, what: 'the share button pressed' });
    await expect([bob], aliceId, 'direct', true, (w) => w > CAMERA.width, "bob sees alice's screen directly");

    // Carol joins while Alice shares: the room goes through the server,
    // where the screen (not the camera) is what Alice sends.
    await joinCall(carol.page, urlFor('carol'));
    for (const b of browsers) await waitForBadge(b.page, 'via server', { timeoutMs: 30_000 });
    await expect([bob, carol], aliceId, 'server', true, (w) => w > CAMERA.width,
      "bob and carol see alice's screen through the server");

    // Stopping: the camera again, everywhere.
    await alice.page.click('#screen-btn');
    await expect([bob, carol], aliceId, 'server', false, (w) => w === CAMERA.width,
      "bob and carol see alice's camera again");
    const state = await clientState(alice.page);
    assert.equal(state.members.length, 2);
  } catch (err) {
    dumpLogs();
    throw err;
  } finally {
    await screenshotAll(browsers, 'screen');
  }
});
