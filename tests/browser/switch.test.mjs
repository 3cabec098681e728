// Make-before-break switching: two browsers talk peer-to-peer, a third joins
// (the room moves to server routing), the third leaves (the room goes back to
// peer-to-peer after the return delay). At every receiver the tile of every
// remote member must keep decoding frames through both switches.
//
// Run inside a loopback-only network namespace (as root):
//   unshare -n sh -c 'ip link set lo up && node --test tests/browser/'

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { clientState, joinCall, pollUntil, rtcSummary, screenshotAll, setUpCall, sleep, waitForBadge } from './harness.mjs';

/** The room returns to peer-to-peer this long after the third member left. */
const RETURN_DELAY_MS = 1_500;
/** Longest tolerated interval between two decoded frames of a rendered member. */
const MAX_FRAME_GAP_MS = 500;
/** Frame gaps are measured until this long after the mode settles. */
const SETTLE_TAIL_MS = 3_000;

/**
 * Starts sampling in the page, every 100 ms: for each remote member, which
 * path its tile renders, framesDecoded of its direct and server video, whether
 * the tile shows video and how many of its <video> elements are audible.
 */
function startSampler(page) {
  return page.evaluate(() => {
    if (window.__sampler) return;
    const samples = [];
    let stopped = false;
    const tick = async () => {
      if (stopped) return;
      const t = performance.now();
      try {
        const state = window.confab.state();
        const frames = new Map();
        for (const pc of [window.confab.pc(), window.confab.serverPc()]) {
          if (!pc || pc.connectionState === 'closed') continue;
          const report = await pc.getStats();
          for (const s of report.values()) {
            if (s.type === 'inbound-rtp' && s.kind === 'video' && s.trackIdentifier) {
              frames.set(s.trackIdentifier, s.framesDecoded ?? 0);
            }
          }
        }
        const members = {};
        for (const m of state?.members ?? []) {
          const tile = document.querySelector(`.tile[data-id="${CSS.escape(m.id)}"]`);
          const audible = tile ? [...tile.querySelectorAll('video')].filter((v) => !v.muted && v.srcObject).length : 0;
          members[m.id] = {
            rendered: m.rendered,
            direct: m.tracks.direct.video ? (frames.get(m.tracks.direct.video) ?? null) : null,
            server: m.tracks.server.video ? (frames.get(m.tracks.server.video) ?? null) : null,
            shown: m.videoShown,
            audible,
          };
        }
        samples.push({ t, mode: state?.mode?.mode ?? null, epoch: state?.epoch ?? null, members });
      } catch (err) {
        samples.push({ t, error: String(err) });
      }
      setTimeout(tick, Math.max(0, 100 - (performance.now() - t)));
    };
    window.__sampler = { samples, stop() { stopped = true; } };
    tick();
  });
}

function samplesOf(page) {
  return page.evaluate(() => window.__sampler?.samples ?? []);
}

const pageNow = (page) => page.evaluate(() => performance.now());

/**
 * For member `id`, from samples in [from, to]: the longest interval between
 * two increases of the framesDecoded of the path the tile renders (the window
 * edges count as bounds, from the member's first rendered frame on if it only
 * appears later). Also: whether the tile ever went blank after showing video,
 * and the most audible elements at once.
 */
function analyse(samples, id, from, to) {
  let last = null; // time of the last increase
  let prev = null;
  let maxGap = 0;
  let worstAt = null;
  let blanked = false;
  let everShown = false;
  let maxAudible = 0;
  const swaps = [];
  for (const s of samples) {
    const m = s.members?.[id];
    if (!m) { prev = null; continue; }
    if (s.t >= from && s.t <= to) {
      maxAudible = Math.max(maxAudible, m.audible);
      if (m.shown) everShown = true;
      else if (everShown) blanked = true;
      const path = m.rendered;
      if (prev && prev.rendered !== path) swaps.push({ t: Math.round(s.t), from: prev.rendered, to: path });
      const value = path ? m[path] : null;
      const before = path && prev ? prev[path] : null;
      const increased = value !== null && before !== null && value > before;
      if (increased) {
        if (last === null) last = s.t; // the gap clock starts at the first rendered frame
        const gap = s.t - last;
        if (gap > maxGap) { maxGap = gap; worstAt = Math.round(s.t); }
        last = s.t;
      }
    }
    prev = m;
  }
  if (last !== null && to - last > maxGap) { maxGap = to - last; worstAt = Math.round(to); }
  if (last === null) maxGap = Infinity;
  return { maxGap: Math.round(maxGap), worstAt, blanked, maxAudible, swaps };
}

/** The page time at which the page entered `mode` (the last such entry at or after `after`). */
function modeEnteredAt(state, mode, after = 0) {
  const entries = state.log.filter((e) => e.event === 'mode' && e.mode === mode && e.at >= after);
  return entries.length ? entries[entries.length - 1].at : null;
}

/** First sample time at or after `from` where member `id`'s `path` counter rose above its value at `from`. */
function firstFrameAfter(samples, id, path, from) {
  let base = null;
  for (const s of samples) {
    const v = s.members?.[id]?.[path];
    // Before `from`: the counter's last value (a path whose track went away starts again at 0).
    if (s.t < from) { base = v ?? null; continue; }
    if (v === null || v === undefined) continue;
    if (base === null) base = 0;
    if (v > base) return s.t;
  }
  return null;
}

test('p2p → server when a third joins → p2p when it leaves, without frame gaps', { timeout: 120_000 }, async (t) => {
  const names = ['alice', 'bob', 'carol'];
  const { server, browsers, urlFor } = await setUpCall(t, {
    names,
    prefix: 'switch',
    server: { args: ['--p2p-return-delay-ms', String(RETURN_DELAY_MS)] },
  });
  const [alice, bob, carol] = browsers;
  const ids = {};
  const nameOf = (id) => Object.keys(ids).find((n) => ids[n] === id) ?? id;
  const failures = [];
  /**
   * Longest frame gap at each receiver for each of `senders`, from `from[label]`
   * until SETTLE_TAIL_MS after the receiver entered `mode` (after `from`).
   * Records failures; returns the printable summary.
   */
  const checkGaps = async (phase, receivers, senders, from, mode) => {
    const lines = [];
    for (const { label, page } of receivers) {
      const [samples, state] = await Promise.all([samplesOf(page), clientState(page)]);
      const settled = modeEnteredAt(state, mode, from[label]);
      assert.ok(settled !== null, `${label} entered ${mode}`);
      for (const other of senders.filter((n) => n !== label)) {
        const r = analyse(samples, ids[other], from[label], settled + SETTLE_TAIL_MS);
        lines.push(`${label}←${other} ${r.maxGap} ms`);
        if (r.maxGap > MAX_FRAME_GAP_MS) failures.push(`${phase}: ${label}←${other} longest frame gap ${r.maxGap} ms (at ${r.worstAt}; swaps ${JSON.stringify(r.swaps)})`);
        if (r.blanked) failures.push(`${phase}: ${label}'s tile of ${other} went blank`);
        if (r.maxAudible > 1) failures.push(`${phase}: ${label} heard ${other} from ${r.maxAudible} elements at once`);
      }
    }
    console.log(`switch ${phase}: longest frame gap ${lines.join(', ')}`);
  };
  /** Every page in `list` reaches mode sfu, decodes two remote videos over the server leg, renders everyone from it. */
  const checkServerRouted = async (list, mediaPort) => {
    const firstStats = await Promise.all(list.map(({ page }) => rtcSummary(page, { leg: 'server' })));
    await sleep(1_000);
    const secondStats = await Promise.all(list.map(({ page }) => rtcSummary(page, { leg: 'server' })));
    for (const [i, { label, page }] of list.entries()) {
      const rising = secondStats[i].videoStreams.filter((s) => {
        const before = firstStats[i].videoStreams.find((x) => x.trackIdentifier === s.trackIdentifier);
        return s.framesDecoded > 0 && s.framesDecoded > (before?.framesDecoded ?? 0);
      });
      console.log(`${label} in sfu: server-leg videos ${secondStats[i].videoStreams.map((s) => s.framesDecoded).join(', ')} frames decoded; pair → ${JSON.stringify(secondStats[i].selectedPair?.remote)}`);
      assert.equal(rising.length, 2, `${label} decodes two remote videos over the server leg (${JSON.stringify(secondStats[i].videoStreams)})`);
      assert.equal(secondStats[i].selectedPair?.remote?.port, mediaPort, `${label}'s server leg goes to the server's media port`);
      assert.equal(await page.evaluate(() => window.confab.pc()), null, `${label} has closed its direct leg`);
      const state = await clientState(page);
      assert.equal(state.serverLeg.sending, true, `${label} sends on its server leg`);
      for (const m of state.members) assert.equal(m.rendered, 'server', `${label} renders ${nameOf(m.id)} from the server`);
      assert.equal(await waitForBadge(page, 'via server', { timeoutMs: 5_000 }), 'via server');
    }
  };
  const shots = (phase, list) => screenshotAll(list, `switch-${phase}`);

  try {
    // --- phase 1: alice + bob, peer-to-peer -------------------------------
    ids.alice = (await joinCall(alice.page, urlFor('alice'))).participantId;
    ids.bob = (await joinCall(bob.page, urlFor('bob'))).participantId;
    await Promise.all([alice, bob].map(({ page }) => waitForBadge(page, 'peer-to-peer', { timeoutMs: 20_000 })));
    const direct = await pollUntil(async () => {
      const s = await Promise.all([rtcSummary(alice.page), rtcSummary(bob.page)]);
      return s.every((x) => x?.selectedPair?.remote && x.video?.framesDecoded > 0) ? s : null;
    }, { timeoutMs: 20_000, what: 'alice and bob to decode each other directly' });
    const legs = await pollUntil(async () => {
      const s = await Promise.all([rtcSummary(alice.page, { leg: 'server' }), rtcSummary(bob.page, { leg: 'server' })]);
      return s.every((x) => x?.connectionState === 'connected' && x.selectedPair?.remote) ? s : null;
    }, { timeoutMs: 15_000, what: 'the server legs of alice and bob to connect' });
    const mediaPort = server.mediaPort ?? legs[0].selectedPair.remote.port;
    console.log(`server: http ${server.port}, media (UDP) ${mediaPort}${server.mediaPort === null ? ' (from the server leg)' : ''}`);
    {
      const [a, b] = direct.map((s) => s.selectedPair);
      assert.equal(a.remote.port, b.local.port, "alice's direct pair points at bob");
      assert.equal(b.remote.port, a.local.port, "bob's direct pair points at alice");
      for (const p of [a, b]) assert.ok(![server.port, mediaPort].includes(p.remote.port), 'the direct pair avoids the server');
      for (const l of legs) assert.equal(l.selectedPair.remote.port, mediaPort, 'server legs go to the media port');
    }
    await pollUntil(async () => {
      const states = await Promise.all([clientState(alice.page), clientState(bob.page)]);
      return states.every((s) => s.members.every((m) => m.rendered === 'direct' && m.videoShown));
    }, { timeoutMs: 10_000, what: 'alice and bob to render each other directly' });
    // The server path is known to be healthy before anyone depends on it: in
    // the header for our own leg, on the tile for the other's.
    for (const [label, page, other] of [['alice', alice.page, 'bob'], ['bob', bob.page, 'alice']]) {
      await pollUntil(async () => (await page.locator('#server-leg').textContent()) === 'server path: ready ✓',
        { timeoutMs: 10_000, what: `${label}'s header to show its server path ready` });
      await pollUntil(async () => (await page.locator(`.tile[data-id="${ids[other]}"] .leg-state`).getAttribute('data-state')) === 'connected',
        { timeoutMs: 10_000, what: `${label}'s tile of ${other} to show ${other}'s server path ready` });
    }
    await shots('1-p2p', [alice, bob]);

    // --- phase 2: carol joins → to_sfu → sfu ------------------------------
    await Promise.all([alice, bob].map(({ page }) => startSampler(page)));
    await sleep(600); // some samples of the steady p2p state
    const switchStart = {
      alice: (await pageNow(alice.page)) - 300,
      bob: (await pageNow(bob.page)) - 300,
    };
    ids.carol = (await joinCall(carol.page, urlFor('carol'))).participantId;
    await startSampler(carol.page);
    await pollUntil(async () => {
      const states = await Promise.all(browsers.map(({ page }) => clientState(page)));
      return states.every((s) => s.mode?.mode === 'sfu');
    }, { timeoutMs: 30_000, what: 'every page to reach mode sfu' });
    await sleep(SETTLE_TAIL_MS + 200);

    // Server-routed media at every page: direct leg closed, two remote videos
    // decoding over the server leg, whose pair goes to the media port.
    await checkServerRouted(browsers, mediaPort);
    await shots('2-sfu', browsers);

    // The server's own count of forwarded packets, from /metrics, while the
    // three are server-routed: it must be moving.
    const forwarded = async () => {
      const text = await (await fetch(`${server.url}/metrics`)).text();
      const value = (kind) => Number(new RegExp(`^confab_forwarded_packets_total\\{kind="${kind}"\\} (\\d+)`, 'm').exec(text)?.[1] ?? 0);
      return { audio: value('audio'), video: value('video') };
    };
    const f1 = await forwarded();
    await sleep(1_000);
    const f2 = await forwarded();
    console.log(`server forwarded packets so far: video ${f2.video}, audio ${f2.audio}; `
      + `rate with 3 members: video ${f2.video - f1.video}/s, audio ${f2.audio - f1.audio}/s`);
    assert.ok(f2.video > f1.video && f2.audio > f1.audio, 'the server is forwarding audio and video');

    // Make-before-break: alice and bob confirmed the server path before the room moved.
    const toSfuReport = [];
    for (const [label, page] of [['alice', alice.page], ['bob', bob.page]]) {
      const state = await clientState(page);
      const toSfu = state.log.find((e) => e.event === 'mode' && e.mode === 'to_sfu');
      const sfuAt = modeEnteredAt(state, 'sfu');
      const ready = state.log.find((e) => e.event === 'media_ready' && e.epoch === toSfu?.epoch);
      assert.ok(toSfu, `${label} went through to_sfu`);
      assert.ok(ready, `${label} sent media_ready for the to_sfu epoch (not the server's deadline)`);
      const samples = await samplesOf(page);
      const peer = label === 'alice' ? 'bob' : 'alice';
      const swap = state.log.find((e) => e.event === 'render' && e.member === ids[peer] && e.to === 'server' && e.at >= toSfu.at);
      const first = firstFrameAfter(samples, ids[peer], 'server', toSfu.at);
      toSfuReport.push(`${label}: to_sfu→first server frame of ${peer} (±100 ms) ${first === null ? 'n/a' : Math.round(first - toSfu.at)} ms, `
        + `swap ${swap ? swap.at - toSfu.at : 'n/a'} ms, media_ready ${ready.at - toSfu.at} ms, sfu ${sfuAt - toSfu.at} ms`);
    }
    const carolSamples = await samplesOf(carol.page);
    const carolState = await clientState(carol.page);
    const carolJoined = carolState.log.find((e) => e.event === 'joined')?.at ?? 0;
    for (const peer of ['alice', 'bob']) {
      const first = firstFrameAfter(carolSamples, ids[peer], 'server', 0);
      toSfuReport.push(`carol: joined→first server frame of ${peer} ${first === null ? 'n/a' : Math.round(first - carolJoined)} ms (page load→joined ${carolJoined} ms)`);
    }
    for (const line of toSfuReport) console.log(`switch to_sfu timing: ${line}`);

    // Frame gaps during the switch, per receiver and remote member (carol's
    // clock starts at her first rendered frame of each).
    await checkGaps('to_sfu', browsers, names, { ...switchStart, carol: 0 }, 'sfu');

    // --- phase 3: carol leaves → (return delay) → to_p2p → p2p --------------
    await carol.page.click('#leave-btn');
    const leftAt = { alice: await pageNow(alice.page), bob: await pageNow(bob.page) };
    await pollUntil(async () => {
      const states = await Promise.all([clientState(alice.page), clientState(bob.page)]);
      return states.every((s) => s.mode?.mode === 'p2p' && s.mode.peer && s.log.some((e) => e.event === 'mode' && e.mode === 'to_p2p' && e.at >= leftAt[s.name]))
        ? states : null;
    }, { timeoutMs: 30_000, what: 'alice and bob to be back to p2p' });
    await sleep(SETTLE_TAIL_MS + 200);

    const back = await pollUntil(async () => {
      const s = await Promise.all([rtcSummary(alice.page), rtcSummary(bob.page)]);
      return s.every((x) => x?.selectedPair?.remote && x.connectionState === 'connected') ? s : null;
    }, { timeoutMs: 10_000, what: 'the direct legs to be connected again' });
    {
      const [a, b] = back.map((s) => s.selectedPair);
      console.log(`back to p2p: alice pair ${JSON.stringify(a)}; bob pair ${JSON.stringify(b)}`);
      assert.equal(a.remote.port, b.local.port, "alice's direct pair points at bob again");
      assert.equal(b.remote.port, a.local.port, "bob's direct pair points at alice again");
      for (const p of [a, b]) assert.ok(![server.port, mediaPort].includes(p.remote.port), 'the direct pair avoids the server');
    }
    const toP2pReport = [];
    const toP2pFrom = {};
    for (const { label, page } of [alice, bob]) {
      const state = await clientState(page);
      assert.equal(state.serverLeg.sending, false, `${label} stopped sending on the server leg`);
      assert.equal(state.serverLeg.connectionState, 'connected', `${label}'s server leg stays warm`);
      for (const m of state.members) assert.equal(m.rendered, 'direct', `${label} renders ${nameOf(m.id)} directly`);
      assert.equal(await waitForBadge(page, 'peer-to-peer', { timeoutMs: 5_000 }), 'peer-to-peer');
      const toP2p = state.log.find((e) => e.event === 'mode' && e.mode === 'to_p2p' && e.at >= leftAt[label]);
      const ready = state.log.find((e) => e.event === 'media_ready' && e.epoch === toP2p.epoch);
      assert.ok(ready, `${label} sent media_ready for the to_p2p epoch`);
      const settled = modeEnteredAt(state, 'p2p', toP2p.at);
      toP2pFrom[label] = toP2p.at - 500;
      const samples = await samplesOf(page);
      const peer = label === 'alice' ? 'bob' : 'alice';
      const swap = state.log.find((e) => e.event === 'render' && e.member === ids[peer] && e.to === 'direct' && e.at >= toP2p.at);
      const first = firstFrameAfter(samples, ids[peer], 'direct', toP2p.at);
      toP2pReport.push(`${label}: left→to_p2p ${Math.round(toP2p.at - leftAt[label])} ms, to_p2p→first direct frame of ${peer} (±100 ms) `
        + `${first === null ? 'n/a' : Math.round(first - toP2p.at)} ms, swap ${swap ? swap.at - toP2p.at : 'n/a'} ms, `
        + `media_ready ${ready.at - toP2p.at} ms, p2p ${settled - toP2p.at} ms`);
    }
    for (const line of toP2pReport) console.log(`switch to_p2p timing: ${line}`);
    await checkGaps('back to p2p', [alice, bob], ['alice', 'bob'], toP2pFrom, 'p2p');
    await shots('3-p2p-again', [alice, bob]);

    // --- phase 4: carol rejoins → to_sfu again ------------------------------
    // alice's and bob's server-leg receivers for each other now hold frame
    // counters from the first server-routed period: the switch must wait for
    // new frames, not take the old counts for decoding.
    const rejoinStart = {
      alice: (await pageNow(alice.page)) - 300,
      bob: (await pageNow(bob.page)) - 300,
      carol: 0,
    };
    await carol.page.click('#rejoin-btn');
    ids.carol = (await pollUntil(async () => {
      const s = await clientState(carol.page);
      return s?.joined && s.participantId !== ids.carol ? s : null;
    }, { timeoutMs: 10_000, what: 'carol to rejoin' })).participantId;
    rejoinStart.carol = await pageNow(carol.page);
    await pollUntil(async () => {
      const states = await Promise.all(browsers.map(({ page }) => clientState(page)));
      return states.every((s) => s.mode?.mode === 'sfu' && s.members.length === 2) ? states : null;
    }, { timeoutMs: 30_000, what: 'every page to reach mode sfu again' });
    await sleep(SETTLE_TAIL_MS + 200);
    await checkServerRouted(browsers, mediaPort);
    for (const [label, page] of [['alice', alice.page], ['bob', bob.page]]) {
      const state = await clientState(page);
      const toSfu = state.log.filter((e) => e.event === 'mode' && e.mode === 'to_sfu').pop();
      assert.ok(toSfu && toSfu.at >= rejoinStart[label], `${label} went through to_sfu again`);
      const ready = state.log.find((e) => e.event === 'media_ready' && e.epoch === toSfu.epoch);
      assert.ok(ready, `${label} sent media_ready for the second to_sfu epoch`);
      console.log(`switch to_sfu again timing: ${label}: media_ready ${ready.at - toSfu.at} ms, sfu ${modeEnteredAt(state, 'sfu', toSfu.at) - toSfu.at} ms`);
    }
    await checkGaps('to_sfu again', browsers, names, rejoinStart, 'sfu');
    await shots('4-sfu-again', browsers);

    // The clients reported each switch's gap; the server's histogram holds
    // them (alice and bob: to_sfu twice, to_p2p once).
    const text = await (await fetch(`${server.url}/metrics`)).text();
    const count = (to) => Number(new RegExp(`^confab_mode_switch_gap_seconds_count\\{to="${to}"\\} (\\d+)`, 'm').exec(text)?.[1] ?? 0);
    const sum = (to) => Number(new RegExp(`^confab_mode_switch_gap_seconds_sum\\{to="${to}"\\} ([0-9.e+-]+)`, 'm').exec(text)?.[1] ?? 0);
    console.log(`switch gaps reported: to sfu ${count('sfu')} (mean ${Math.round(1000 * sum('sfu') / count('sfu'))} ms), `
      + `to p2p ${count('p2p')} (mean ${Math.round(1000 * sum('p2p') / count('p2p'))} ms)`);
    assert.ok(count('sfu') >= 4, `switch reports to sfu: ${count('sfu')}`);
    assert.ok(count('p2p') >= 2, `switch reports to p2p: ${count('p2p')}`);

    assert.deepEqual(failures, [], 'make-before-break held at every receiver');
  } catch (err) {
    for (const b of browsers) {
      console.log(b.logs.filter((l) => !l.includes('debug:')).slice(-40).join('\n'));
      const state = await clientState(b.page).catch(() => null);
      if (state) console.log(`[${b.label}] state log: ${JSON.stringify(state.log)}`);
    }
    console.log(`--- server output ---\n${server.output().slice(-20_000)}`);
    await shots('failure', browsers);
    throw err;
  }
});
