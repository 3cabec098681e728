// A rolling update as a browser sees it: the server it is connected to
// drains and goes away (SIGTERM, the drain deadline passes), a new server
// takes its address, and both browsers rejoin the room by themselves and
// talk again.
//
// Run inside a loopback-only network namespace (as root):
//   unshare -n sh -c 'ip link set lo up && node --test tests/browser/'

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { clientState, firstRemoteFrameTime, joinCall, pollUntil, rtcSummary, setUpCall, sleep, startServer, within } from './harness.mjs';

/** Frames decoded on the direct leg rise at both pages over `ms`. */
async function bothDecoding(pages, ms = 1_000) {
  const before = await Promise.all(pages.map((p) => rtcSummary(p)));
  await sleep(ms);
  const after = await Promise.all(pages.map((p) => rtcSummary(p)));
  return pages.map((_, i) => (after[i]?.video?.framesDecoded ?? 0) - (before[i]?.video?.framesDecoded ?? 0));
}

test('after the server is replaced, both browsers rejoin by themselves and talk again', { timeout: 90_000 }, async (t) => {
  // The old server drains for at most 1 s once told to stop.
  const { server: first, browsers, urlFor: url } = await setUpCall(t, {
    prefix: 'reconnect',
    server: { args: ['--drain-timeout-secs', '1'] },
  });
  const [alice, bob] = browsers;
  let second = null;
  try {
    await joinCall(alice.page, url('alice'));
    await bob.page.goto(url('bob'));
    const firstFrames = await Promise.all([alice.page, bob.page].map((p) => firstRemoteFrameTime(p, { timeoutMs: 30_000 })));
    assert.ok(firstFrames.every((f) => f !== null), 'the call is up before the update');
    const before = await Promise.all([alice.page, bob.page].map((p) => clientState(p)));

    // The update: SIGTERM, the drain deadline passes, the members are told
    // `server_shutdown`, the old process exits; the new one takes its port.
    const stoppedAt = Date.now();
    first.child.kill('SIGTERM');
    const exit = await within(first.exited, 10_000, null);
    assert.ok(exit, 'the old server exited');
    assert.equal(exit.code, 0, 'and cleanly');
    second = await startServer({ listen: `127.0.0.1:${first.port}` });
    const serverUpAt = Date.now();

    // Each page had scheduled a rejoin on its own.
    for (const [label, page] of [['alice', alice.page], ['bob', bob.page]]) {
      const state = await pollUntil(async () => {
        const s = await clientState(page);
        return s?.joined && s.participantId !== before[label === 'alice' ? 0 : 1].participantId ? s : null;
      }, { timeoutMs: 30_000, what: `${label} to rejoin the new server` });
      assert.ok(state, `${label} rejoined`);
    }
    const rejoinedAt = Date.now();
    const frames = await pollUntil(async () => {
      const d = await bothDecoding([alice.page, bob.page], 500);
      return d.every((n) => n > 0) ? d : null;
    }, { timeoutMs: 30_000, what: 'both to decode each other again' });
    const talkingAt = Date.now();
    const states = await Promise.all([alice.page, bob.page].map((p) => clientState(p)));
    const scheduled = states.map((s) => s.reconnects);
    console.log(`reconnect: old server stopped, new one up after ${serverUpAt - stoppedAt} ms; both rejoined `
      + `${rejoinedAt - serverUpAt} ms later and decode each other ${talkingAt - serverUpAt} ms after the new server `
      + `was up (frames in 500 ms: ${frames}); rejoins scheduled: alice ${JSON.stringify(scheduled[0])}, `
      + `bob ${JSON.stringify(scheduled[1])}`);
    for (const [i, label] of ['alice', 'bob'].entries()) {
      assert.ok(scheduled[i].length >= 1, `${label} scheduled a rejoin`);
      assert.equal(scheduled[i][0].reason, 'server_shutdown', `${label} was told why`);
      assert.equal(states[i].mode.mode, 'p2p', `${label} is in a two-person call again`);
    }
  } catch (err) {
    for (const b of browsers) console.log(b.logs.slice(-40).join('\n'));
    console.log(`--- old server ---\n${first.output().slice(-5_000)}`);
    if (second) console.log(`--- new server ---\n${second.output().slice(-5_000)}`);
    throw err;
  } finally {
    await Promise.all(browsers.map((b) => b.close()));
    await second?.stop();
  }
});
