// Two browsers forced to relay-only (`?relay=1` → iceTransportPolicy
// 'relay') complete a call through Confab's embedded TURN server, with the
// time-limited credentials from `joined`. The relay is allowed to reach
// loopback peers (--turn-allow-loopback), as a local demo needs.
//
// Run inside a loopback-only network namespace (as root):
//   unshare -n sh -c 'ip link set lo up && node --test tests/browser/relay.test.mjs'

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { clientState, firstRemoteFrameTime, joinCall, pollUntil, rtcSummary, screenshotAll, setUpCall, sleep, waitForBadge } from './harness.mjs';

/** The relay port range the server is started with. */
const RELAY_PORTS = [50000, 50999];

/** Sum of a metric over its label sets in a Prometheus text exposition. */
function metricSum(text, name) {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) sum += Number(line.split(' ').pop());
  }
  return sum;
}

async function metrics(server) {
  return (await fetch(`${server.url}/metrics`)).text();
}

test('two relay-only browsers call through the embedded TURN server', { timeout: 90_000 }, async (t) => {
  const { server, browsers, urlFor, dumpLogs } = await setUpCall(t, {
    prefix: 'relay',
    server: { args: ['--turn-allow-loopback', '--turn-relay-ports', RELAY_PORTS.join('-')] },
    query: '&relay=1',
  });
  assert.ok(server.turnPort, 'the server printed its STUN/TURN port');
  const [alice, bob] = browsers;

  try {
    const aliceState = await joinCall(alice.page, urlFor('alice'));
    await bob.page.goto(urlFor('bob'));
    const [aliceFirst, bobFirst] = await Promise.all([
      firstRemoteFrameTime(alice.page, { timeoutMs: 30_000 }),
      firstRemoteFrameTime(bob.page, { timeoutMs: 30_000 }),
    ]);
    console.log(`first remote frame over the relay: alice ${aliceFirst ?? 'none'} ms, bob ${bobFirst ?? 'none'} ms`);
    assert.ok(aliceFirst !== null, 'alice decoded no remote video frame within 30 s');
    assert.ok(bobFirst !== null, 'bob decoded no remote video frame within 30 s');

    // The credentials came from `joined`: `<expiry>:<participant id>`, not from the page.
    const ice = await alice.page.evaluate(() => window.confab.pc().getConfiguration());
    assert.equal(ice.iceTransportPolicy, 'relay');
    const turnEntry = ice.iceServers.find((s) => [].concat(s.urls).some((u) => u.startsWith('turn:')));
    assert.ok(turnEntry, `a TURN server is configured: ${JSON.stringify(ice.iceServers)}`);
    const [expiry, who] = turnEntry.username.split(':');
    assert.equal(who, aliceState.participantId, 'the TURN username names the participant');
    assert.ok(Number(expiry) > Date.now() / 1000, 'the TURN credential has not expired');
    assert.ok(turnEntry.credential.length >= 28, 'an HMAC-SHA1 credential');

    // The direct leg's selected pairs are relay candidates on both ends,
    // allocated on Confab's TURN port, and frames keep being decoded.
    const before = await pollUntil(async () => {
      const s = await Promise.all([rtcSummary(alice.page), rtcSummary(bob.page)]);
      return s.every((x) => x?.connectionState === 'connected' && x.selectedPair?.local && x.selectedPair?.remote) ? s : null;
    }, { timeoutMs: 15_000, what: 'both direct legs connected with a selected pair' });
    const relayedBefore = metricSum(await metrics(server), 'confab_turn_relayed_packets_total');
    await sleep(2_000);
    const after = await Promise.all([rtcSummary(alice.page), rtcSummary(bob.page)]);
    const relayedAfter = metricSum(await metrics(server), 'confab_turn_relayed_packets_total');
    for (const [i, name] of ['alice', 'bob'].entries()) {
      const pair = after[i].selectedPair;
      console.log(`${name} direct pair: ${JSON.stringify(pair)}`);
      for (const end of ['local', 'remote']) {
        assert.equal(pair[end].candidateType, 'relay', `${name}'s ${end} candidate is a relay candidate`);
        assert.equal(pair[end].address, '127.0.0.1');
        assert.ok(pair[end].port >= RELAY_PORTS[0] && pair[end].port <= RELAY_PORTS[1],
          `${name}'s ${end} candidate is a relayed address from the relay range (${pair[end].port})`);
      }
      assert.ok(pair.local.url?.includes(`:${server.turnPort}`),
        `${name}'s relay candidate was allocated on Confab's TURN port ${server.turnPort} (${pair.local.url})`);
      const first = before[i].video?.framesDecoded ?? 0;
      const second = after[i].video?.framesDecoded ?? 0;
      console.log(`${name}: framesDecoded ${first} → ${second} over ${Math.round(after[i].now - before[i].now)} ms`);
      assert.ok(second > first, `${name}'s framesDecoded keeps rising over the relay (${first} → ${second})`);
    }
    const [a, b] = after.map((s) => s.selectedPair);
    assert.equal(a.remote.port, b.local.port, "alice sends to bob's relayed address");
    assert.equal(b.remote.port, a.local.port, "bob sends to alice's relayed address");

    // The server legs are relayed too (the policy covers every connection).
    for (const [label, page] of [['alice', alice.page], ['bob', bob.page]]) {
      const leg = await pollUntil(async () => {
        const s = await rtcSummary(page, { leg: 'server' });
        return s?.connectionState === 'connected' && s.selectedPair?.local ? s : null;
      }, { timeoutMs: 15_000, what: `${label}'s server leg connected` });
      assert.equal(leg.selectedPair.local.candidateType, 'relay', `${label}'s server leg uses a relay candidate`);
      assert.equal(leg.selectedPair.remote.port, server.mediaPort, `${label}'s server leg ends at the media port`);
    }

    // The badge tells the user.
    assert.equal(await waitForBadge(alice.page, 'relayed', { timeoutMs: 5_000 }), 'relayed');
    assert.equal(await waitForBadge(bob.page, 'relayed', { timeoutMs: 5_000 }), 'relayed');
    assert.equal((await clientState(alice.page)).path, 'relayed');

    const text = await metrics(server);
    const total = metricSum(text, 'confab_turn_relayed_packets_total');
    const bytes = metricSum(text, 'confab_turn_relayed_bytes_total');
    console.log(`the relay forwarded ${total} datagrams (${bytes} bytes) so far, `
      + `${relayedAfter - relayedBefore} in the 2 s sampled; `
      + `allocations: ${metricSum(text, 'confab_turn_allocations')} live, ${metricSum(text, 'confab_turn_allocations_total')} created`);
    assert.ok(relayedAfter - relayedBefore > 100, `the relay carries the call (${relayedAfter - relayedBefore} datagrams in 2 s)`);
    assert.ok(metricSum(text, 'confab_turn_allocations') >= 4, 'two allocations per browser at least (direct and server leg)');
  } catch (err) {
    dumpLogs();
    throw err;
  } finally {
    await screenshotAll(browsers, 'relay');
  }
});
