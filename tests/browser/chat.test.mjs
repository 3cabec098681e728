// Chat between two browsers: a message to the room shows at the other page
// as text (never markup) with an unread count, a private reply reaches only
// its recipient, both pages list what they sent, a message the server
// refuses (chat rate) is marked undelivered, and a private message to a
// member who left is not sent to everyone instead.
//
// Run inside a loopback-only network namespace (as root):
//   unshare -n sh -c 'ip link set lo up && node --test tests/browser/'

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { clientState, joinCall, pollUntil, screenshotAll, setUpCall } from './harness.mjs';

test('chat reaches the room as text, privately the one member', { timeout: 60_000 }, async (t) => {
  // One chat message per member, then one per 10 s: the second is refused.
  const { browsers, urlFor, dumpLogs } = await setUpCall(t, {
    prefix: 'chat',
    server: { args: ['--chat-burst', '1', '--chat-rate-per-sec', '0.1'] },
  });
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

    // Over the chat rate: Alice's second message is refused and marked so.
    await alice.page.fill('#chat-text', 'one too many');
    await alice.page.press('#chat-text', 'Enter');
    await pollUntil(async () => (await chatOf(alice.page)).find((e) => e.text === 'one too many')?.failed,
      { timeoutMs: 5_000, what: 'the refused message marked undelivered' });
    assert.match(await alice.page.textContent('#chat-log'), /not delivered/);
    assert.ok(!(await chatOf(bob.page)).some((e) => e.text === 'one too many'), 'bob never got it');

    // Alice leaves while Bob's recipient is still Alice: his next message
    // is not sent (to her or to everyone), and he is told why.
    await alice.page.click('#leave-btn');
    await pollUntil(async () => (await clientState(bob.page)).members.length === 0,
      { timeoutMs: 5_000, what: 'alice gone at bob' });
    assert.equal(await bob.page.inputValue('#chat-to'), aliceState.participantId);
    assert.match(await bob.page.textContent('#chat-to'), /alice \(left the room\)/);
    const before = (await chatOf(bob.page)).length;
    await bob.page.fill('#chat-text', 'are you there?');
    await bob.page.press('#chat-text', 'Enter');
    assert.match(await bob.page.textContent('#chat-log'), /has left the room: the message was not sent/);
    assert.equal((await chatOf(bob.page)).length, before, 'nothing sent');
    assert.equal(await bob.page.inputValue('#chat-text'), 'are you there?', 'the text is kept');
  } catch (err) {
    dumpLogs();
    throw err;
  } finally {
    await screenshotAll(browsers, 'chat');
  }
});
