// Active speakers in real browsers. Alice's fake microphone plays a tone,
// Bob's and Carol's play silence (Chromium's --use-file-for-fake-audio-capture).
// Peer-to-peer, each page measures speech from its own stats; once Carol
// joins and media goes through the server, the lists come from the server,
// which reads the audio levels Chromium puts in its packets (RFC 6464).
// Every page must mark Alice, and only her, as the speaker; when she mutes,
// nobody.
//
// Run inside a loopback-only network namespace (as root):
//   unshare -n sh -c 'ip link set lo up && node --test tests/browser/'

import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { clientState, joinCall, pollUntil, screenshotAll, setUpCall, waitForBadge } from './harness.mjs';

/**
 * Writes a tone and a silence WAV into a temporary directory removed after
 * the test `t`; returns `audioFor(talker)`: Chromium flags for a member's
 * fake microphone, the tone for `talker`, silence for the others.
 */
async function fakeMicrophones(t) {
  const dir = await mkdtemp(path.join(tmpdir(), 'confab-audio-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const tone = path.join(dir, 'tone.wav');
  const silence = path.join(dir, 'silence.wav');
  // 0.3 of full scale: about -13.5 dBov RMS, like a close talker.
  await writeFile(tone, wav(0.3));
  await writeFile(silence, wav(0));
  return (talker) => (name) => [`--use-file-for-fake-audio-capture=${name === talker ? tone : silence}`];
}

/** A 2 s mono 16-bit 48 kHz WAV: a 440 Hz tone at `amplitude` (0 = silence). */
function wav(amplitude) {
  const rate = 48_000;
  const samples = rate * 2;
  const buf = Buffer.alloc(44 + samples * 2);
  buf.write('RIFF', 0);
  buf.writeUInt32LE(36 + samples * 2, 4);
  buf.write('WAVEfmt ', 8);
  buf.writeUInt32LE(16, 16); // fmt chunk size
  buf.writeUInt16LE(1, 20); // PCM
  buf.writeUInt16LE(1, 22); // mono
  buf.writeUInt32LE(rate, 24);
  buf.writeUInt32LE(rate * 2, 28); // byte rate
  buf.writeUInt16LE(2, 32); // block align
  buf.writeUInt16LE(16, 34); // bits per sample
  buf.write('data', 36);
  buf.writeUInt32LE(samples * 2, 40);
  for (let i = 0; i < samples; i++) {
    const v = Math.round(amplitude * 32767 * Math.sin((2 * Math.PI * 440 * i) / rate));
    buf.writeInt16LE(v, 44 + i * 2);
  }
  return buf;
}

/** Decoded frames of member `id`'s video on the server path at `page`. */
function serverFrames(page, id) {
  return page.evaluate(async (id) => {
    const member = window.confab.state().members.find((m) => m.id === id);
    const trackId = member?.tracks.server.video;
    const pc = window.confab.serverPc();
    if (!trackId || !pc) return 0;
    const report = await pc.getStats();
    const inbound = [...report.values()].find((s) => s.type === 'inbound-rtp' && s.trackIdentifier === trackId);
    return inbound?.framesDecoded ?? 0;
  }, id);
}

/** Tile ids each page marks as speaking (dataset), and its state's list. */
async function speakersOf(page) {
  const [state, marked] = await Promise.all([
    clientState(page),
    page.evaluate(() => [...document.querySelectorAll('.tile[data-speaking]')]
      .map((t) => `${t.dataset.id}:${t.dataset.speaking}`)),
  ]);
  return { list: state?.speakers ?? null, source: state?.speakersSource ?? null, marked };
}

test('every page marks the member who talks, peer-to-peer and through the server', { timeout: 90_000 }, async (t) => {
  const audioFor = await fakeMicrophones(t);
  const { browsers, urlFor, dumpLogs } = await setUpCall(t, {
    names: ['alice', 'bob', 'carol'],
    prefix: 'speakers',
    browserArgs: audioFor('alice'),
  });
  const [alice, bob, carol] = browsers;

  /**
   * Waits until every page's list is `expected(page index)`, came from
   * `source` ('stats' or 'server'), and its tiles are marked to match.
   */
  const expectEverywhere = async (pages, source, expected, what, timeoutMs = 10_000) => {
    const started = Date.now();
    await pollUntil(async () => {
      const seen = await Promise.all(pages.map((b) => speakersOf(b.page)));
      return seen.every((s, i) => {
        const want = expected(i);
        const marks = want.map((id, rank) => `${id}:${rank === 0 ? 'dominant' : 'yes'}`);
        return s.source === source && JSON.stringify(s.list) === JSON.stringify(want)
          && JSON.stringify([...s.marked].sort()) === JSON.stringify([...marks].sort());
      }) ? seen : null;
    }, { timeoutMs, intervalMs: 100, what });
    return Date.now() - started;
  };

  try {
    const aliceState = await joinCall(alice.page, urlFor('alice'));
    await joinCall(bob.page, urlFor('bob'));
    await waitForBadge(alice.page, 'peer-to-peer', { timeoutMs: 20_000 });
    await waitForBadge(bob.page, 'peer-to-peer', { timeoutMs: 20_000 });
    const aliceId = aliceState.participantId;
    // Alice's own page marks her local tile; the others mark her tile by id.
    const aliceAs = (i) => [i === 0 ? 'local' : aliceId];

    const p2pMs = await expectEverywhere([alice, bob], 'stats', aliceAs, 'alice marked as speaking peer-to-peer');

    await joinCall(carol.page, urlFor('carol'));
    for (const b of browsers) await waitForBadge(b.page, 'via server', { timeoutMs: 30_000 }).catch(async (err) => {
      throw new Error(`${b.label}: ${err.message} (state ${JSON.stringify(await clientState(b.page))})`);
    });
    const sfuMs = await expectEverywhere(browsers, 'server', aliceAs, 'alice marked as speaking through the server', 15_000);
    const modes = await Promise.all(browsers.map(async (b) => (await clientState(b.page)).mode.mode));
    assert.deepEqual(modes, ['sfu', 'sfu', 'sfu'], 'the lists were checked with media through the server');

    // Speaker view at Bob: Alice, the speaker, large above the others.
    await bob.page.click('#view-btn');
    await pollUntil(async () => {
      const s = await clientState(bob.page);
      return s.view === 'speaker' && s.featured === aliceId;
    }, { timeoutMs: 5_000, what: 'speaker view featuring alice at bob' });
    const width = async (id) => (await bob.page.locator(`.tile[data-id="${id}"]`).boundingBox()).width;
    const [featuredW, otherW] = [await width(aliceId), await width('local')];
    console.log(`speaker view at bob: alice's tile ${featuredW} px wide, bob's own ${otherW} px`);
    assert.ok(featuredW > 2 * otherW, 'the speaker is shown large');

    // Alice mutes: her browser sends silence, and nobody is marked.
    await alice.page.click('#mic-btn');
    const mutedMs = await expectEverywhere(browsers, 'server', () => [], 'no speaker after alice muted');
    console.log(`speakers: alice marked ${p2pMs} ms after p2p was up (local stats), `
      + `${sfuMs} ms after all showed the server path (server lists); list empty ${mutedMs} ms after she muted`);
  } catch (err) {
    dumpLogs();
    throw err;
  } finally {
    await screenshotAll(browsers, 'speakers');
  }
});

test('with --last-n 1 every page gets only the speaker\'s video and shows the others paused', { timeout: 90_000 }, async (t) => {
  // Carol talks; Alice and Bob are silent.
  const audioFor = await fakeMicrophones(t);
  const { server, browsers, urlFor, dumpLogs } = await setUpCall(t, {
    names: ['alice', 'bob', 'carol'],
    prefix: 'last-n',
    server: { args: ['--last-n', '1'] },
    browserArgs: audioFor('carol'),
  });
  const [alice, bob, carol] = browsers;

  try {
    const ids = [];
    for (const b of browsers) ids.push((await joinCall(b.page, urlFor(b.label))).participantId);
    const [aliceId, bobId, carolId] = ids;
    for (const b of browsers) await waitForBadge(b.page, 'via server', { timeoutMs: 30_000 });

    // Everyone watches Carol, who watches Alice (the first to join).
    const want = [[carolId], [carolId], [aliceId]];
    await pollUntil(async () => {
      const states = await Promise.all(browsers.map((b) => clientState(b.page)));
      return states.every((s, i) => JSON.stringify(s.forwardedVideo) === JSON.stringify(want[i]));
    }, { timeoutMs: 15_000, what: 'each page told which video it receives' });
    // The others' tiles show the avatar, marked paused.
    const held = (page, id) => page.getAttribute(`.tile[data-id="${id}"]`, 'data-held');
    await pollUntil(async () => (await held(alice.page, bobId)) === 'true'
      && (await held(alice.page, carolId)) === 'false'
      && (await held(carol.page, bobId)) === 'true'
      && (await held(carol.page, aliceId)) === 'false',
    { timeoutMs: 5_000, what: 'held tiles marked' });

    // Frames: Carol's video decodes at Alice, Bob's does not arrive.
    const before = await Promise.all([serverFrames(alice.page, carolId), serverFrames(alice.page, bobId)]);
    await new Promise((r) => setTimeout(r, 1500));
    const after = await Promise.all([serverFrames(alice.page, carolId), serverFrames(alice.page, bobId)]);
    console.log(`last-n at alice over 1.5 s: carol +${after[0] - before[0]} frames, bob +${after[1] - before[1]}`);
    assert.ok(after[0] - before[0] >= 10, "carol's video decodes at alice");
    assert.equal(after[1], before[1], "bob's video is not forwarded to alice");

    // Held videos did not stall the switch: every page reported media_ready.
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    const line = metrics.split('\n').find((l) => l.startsWith('confab_mode_switches_total{')
      && l.includes('from="to_sfu"') && l.includes('to="sfu"'));
    assert.match(line ?? '', /reason="media_ready"/, `the switch to the server completed on media_ready: ${line}`);
  } catch (err) {
    dumpLogs();
    throw err;
  } finally {
    await screenshotAll(browsers, 'last-n');
  }
});
