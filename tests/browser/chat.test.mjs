// Chat between two browsers: a message to the room shows at the other page
// as text (never markup) with an unread count, a private reply reaches only
// its recipient, and both pages list what they sent.
//
// Run inside a loopback-only network namespace (as root):
//   unshare -n sh -c 'ip link set lo up && node --test tests/browser/'

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { clientState, joinCall, pollUntil, screenshotAll, setUpCall } from './harness.mjs';

test('chat reaches the room as text, privately the one member', { timeout: 60_000 }, async (t) => {
  const { browsers, urlFor, dumpLogs } = await setUpCall(t, { prefix: 'chat' });
  const [alice, bob] = browsers;
  const chatOf = async (page) => (await clientState(page)).chat;

  try {
    const aliceState = await joinCall(alice.page, urlFor('alice'));
    const bobState = await joinCall(bob.page, urlFor('bob'));
    await pollUntil(async () => (await clientState(alice.page)).members.length === 1,
      { what: 'alice to see bob' });

    // Alice writes to the room (Enter sends).
    const text = 'hello <b>bob</b> & all';
    await alice.page.click('#chat-btn');
    await alice.page.fill('#chat-text', text);
    await alice.page.press('#chat-text', 'Enter');
    assert.equal(await alice.page.inputValue('#chat-text'), '', 'the box is emptied after sending');

    // Bob's page: the message, unread until he opens the panel, shown as text.
    const [got] = await pollUntil(async () => {
      const entries = await chatOf(bob.page);
      return entries.length ? entries : null;
    }, { timeoutMs: 5_000, what: "alice's message at bob" });
    assert.equal(got.text, text);
    assert.equal(got.from, aliceState.participantId);
    assert.equal(got.name, 'alice');
    assert.equal(got.private, false);
    assert.equal(await bob.page.textContent('#chat-unread'), '1');
    assert.match(await bob.page.getAttribute('#chat-btn', 'aria-label'), /1 unread/);
    await bob.page.click('#chat-btn');
    assert.equal(await bob.page.isHidden('#chat-unread'), true, 'opening the panel clears the count');
    assert.equal(await bob.page.locator('#chat-log b').count(), 0, 'no markup from a message');
    assert.match(await bob.page.textContent('#chat-log'), /hello <b>bob<\/b> & all/);

    // Bob answers privately.
    await bob.page.selectOption('#chat-to', aliceState.participantId);
    await bob.page.fill('#chat-text', 'just you');
    await bob.page.click('#chat-form button[type="submit"]');
    const reply = await pollUntil(async () => (await chatOf(alice.page)).find((e) => !e.mine),
      { timeoutMs: 5_000, what: "bob's private reply at alice" });
    assert.equal(reply.text, 'just you');
    assert.equal(reply.private, true);
    assert.equal(reply.from, bobState.participantId);

    // Each page lists its own message as sent, once.
    const [mineA, mineB] = await Promise.all([chatOf(alice.page), chatOf(bob.page)]);
    assert.deepEqual(mineA.filter((e) => e.mine).map((e) => e.text), [text]);
    assert.deepEqual(mineB.filter((e) => e.mine).map((e) => [e.text, e.private]), [['just you', true]]);
  } catch (err) {
    dumpLogs();
    throw err;
  } finally {
    await screenshotAll(browsers, 'chat');
  }
});
