// Two browsers, one room: media must flow directly between them (protocol
// version 2: each client also keeps a warm, silent server leg).
//
// Run inside a loopback-only network namespace (as root):
//   unshare -n sh -c 'ip link set lo up && node --test tests/browser/'

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { clientState, firstRemoteFrameTime, joinCall, pollUntil, rtcSummary, screenshotAll, setUpCall, sleep, waitForBadge } from './harness.mjs';

test('two browsers call each other peer-to-peer', { timeout: 60_000 }, async (t) => {
  const { server, browsers, urlFor, dumpLogs } = await setUpCall(t, { prefix: 'p2p' });
  const [alice, bob] = browsers;

  try {
    // Alice joins first (polite), Bob second (impolite: he makes the offer).
    await joinCall(alice.page, urlFor('alice'));
    await bob.page.goto(urlFor('bob'));

    const [aliceFirst, bobFirst] = await Promise.all([
      firstRemoteFrameTime(alice.page, { timeoutMs: 30_000 }),
      firstRemoteFrameTime(bob.page, { timeoutMs: 30_000 }),
    ]);
    console.log(`first remote frame: alice ${aliceFirst ?? 'none'} ms, bob ${bobFirst ?? 'none'} ms`);
    assert.ok(aliceFirst !== null, 'alice decoded no remote video frame within 30 s');
    assert.ok(bobFirst !== null, 'bob decoded no remote video frame within 30 s');

    // Roles as the protocol assigns them: the later member is impolite.
    const [aliceState, bobState] = await Promise.all([clientState(alice.page), clientState(bob.page)]);
    assert.equal(aliceState.mode.mode, 'p2p');
    assert.equal(bobState.mode.mode, 'p2p');
    assert.equal(aliceState.mode.peer, bobState.participantId, "alice's peer is bob");
    assert.equal(bobState.mode.peer, aliceState.participantId, "bob's peer is alice");
    assert.equal(aliceState.mode.polite, true, 'alice (first) is polite');
    assert.equal(bobState.mode.polite, false, 'bob (later) is impolite');

    // Both clients also hold a server leg: connected to the server's UDP media port.
    const legs = await pollUntil(async () => {
      const s = await Promise.all([rtcSummary(alice.page, { leg: 'server' }), rtcSummary(bob.page, { leg: 'server' })]);
      return s.every((x) => x?.connectionState === 'connected' && x.selectedPair?.remote) ? s : null;
    }, { timeoutMs: 15_000, what: 'both server legs connected with a selected pair' });
    for (const [i, name] of ['alice', 'bob'].entries()) {
      const pair = legs[i].selectedPair;
      console.log(`${name} server leg pair: ${JSON.stringify(pair)}`);
      if (server.mediaPort !== null) {
        assert.equal(pair.remote.port, server.mediaPort, `${name}'s server leg goes to the server's media port`);
      }
    }
    const mediaPort = server.mediaPort ?? legs[0].selectedPair.remote.port;

    // Frames keep being decoded on both sides.
    const before = await pollUntil(async () => {
      const s = await Promise.all([rtcSummary(alice.page), rtcSummary(bob.page)]);
      return s.every((x) => x?.connectionState === 'connected' && x.selectedPair) ? s : null;
    }, { timeoutMs: 15_000, what: 'both peer connections connected with a selected pair' });
    await sleep(1_200);
    const after = await Promise.all([rtcSummary(alice.page), rtcSummary(bob.page)]);
    for (const [i, name] of ['alice', 'bob'].entries()) {
      const first = before[i].video?.framesDecoded ?? 0;
      const second = after[i].video?.framesDecoded ?? 0;
      console.log(`${name}: framesDecoded ${first} → ${second} over ${Math.round(after[i].now - before[i].now)} ms`);
      assert.ok(first > 0, `${name} has decoded remote video frames`);
      assert.ok(second > first, `${name}'s framesDecoded keeps rising (${first} → ${second})`);
    }

    // The selected pairs point at each other, not at the server.
    const [a, b] = after.map((s) => s.selectedPair);
    console.log(`alice pair: ${JSON.stringify(a)}`);
    console.log(`bob pair:   ${JSON.stringify(b)}`);
    assert.ok(a?.local && a?.remote && b?.local && b?.remote, 'both sides have a selected candidate pair');
    assert.equal(a.remote.port, b.local.port, "alice's remote candidate is bob's local candidate");
    assert.equal(b.remote.port, a.local.port, "bob's remote candidate is alice's local candidate");
    assert.notEqual(a.remote.port, server.port, 'alice is not connected to the server port');
    assert.notEqual(b.remote.port, server.port, 'bob is not connected to the server port');
    assert.notEqual(a.remote.port, mediaPort, "alice's direct leg does not go to the server's media port");
    assert.notEqual(b.remote.port, mediaPort, "bob's direct leg does not go to the server's media port");

    // In p2p the server leg is warm but silent: nothing is sent on it.
    for (const [label, page] of [['alice', alice.page], ['bob', bob.page]]) {
      const leg = (await clientState(page)).serverLeg;
      assert.equal(leg.sending, false, `${label} sends nothing on the server leg in p2p`);
      const senders = await page.evaluate(() => window.confab.serverPc().getSenders().map((s) => s.track?.kind ?? null));
      assert.ok(senders.every((k) => k === null), `${label}'s server-leg senders carry no track (${senders})`);
    }

    // The badge tells the user.
    assert.equal(await waitForBadge(alice.page, 'peer-to-peer', { timeoutMs: 5_000 }), 'peer-to-peer');
    assert.equal(await waitForBadge(bob.page, 'peer-to-peer', { timeoutMs: 5_000 }), 'peer-to-peer');
  } catch (err) {
    dumpLogs();
    throw err;
  } finally {
    await screenshotAll(browsers, 'p2p');
  }
});

test('mute shows on the other side; leave ends the call; rejoin reconnects', { timeout: 60_000 }, async (t) => {
  const { browsers, urlFor, dumpLogs } = await setUpCall(t, { prefix: 'p2p' });
  const [alice, bob] = browsers;

  try {
    await joinCall(alice.page, urlFor('alice'));
    const bobState = await joinCall(bob.page, urlFor('bob'));
    await waitForBadge(alice.page, 'peer-to-peer', { timeoutMs: 20_000 });
    await waitForBadge(bob.page, 'peer-to-peer', { timeoutMs: 20_000 });

    // Bob mutes his microphone: his toggle is pressed, Alice sees the indicator.
    await bob.page.click('#mic-btn');
    assert.equal(await bob.page.getAttribute('#mic-btn', 'aria-pressed'), 'true');
    const micOff = alice.page.locator(`.tile[data-id="${bobState.participantId}"] .mic-off`);
    await pollUntil(() => micOff.isVisible(), { timeoutMs: 5_000, what: "bob's muted-microphone indicator at alice" });

    // Bob leaves: he sees the "left" screen, Alice is alone again, her peer connection is gone.
    await bob.page.click('#leave-btn');
    await pollUntil(async () => (await bob.page.locator('#ended-view').isVisible()), { timeoutMs: 5_000, what: "bob's left screen" });
    assert.match(await bob.page.locator('#ended-title').textContent(), /you left/i);
    await waitForBadge(alice.page, 'waiting for others', { timeoutMs: 5_000 });
    await pollUntil(async () => {
      const state = await clientState(alice.page);
      const tiles = await alice.page.locator('.tile').count();
      return state.mode.peer === null && state.members.length === 0 && tiles === 1
        && (await alice.page.evaluate(() => window.confab.pc() === null));
    }, { timeoutMs: 5_000, what: "alice's call to be torn down" });

    // Bob rejoins: a new peer connection, media flows again.
    await bob.page.click('#rejoin-btn');
    await waitForBadge(alice.page, 'peer-to-peer', { timeoutMs: 20_000 });
    await waitForBadge(bob.page, 'peer-to-peer', { timeoutMs: 20_000 });
    for (const { label, page } of browsers) {
      await pollUntil(async () => (await rtcSummary(page))?.video?.framesDecoded > 0,
        { timeoutMs: 10_000, what: `${label} to decode video after the rejoin` });
    }
  } catch (err) {
    dumpLogs();
    throw err;
  }
});
