// A JavaScript plugin that misbehaves on purpose, by its `mode` config.
// Never ship this.
//
// - `loop`: never returns.
// - `memory`: grows an array until something stops it.
// - `huge`: returns a 20 MiB subject (the outcome limit is 16 MiB).
// - `throw`: throws an error with a message.
// - `ok`: one email, subject "ok".

import { Email, Outcome, config, onWebhook } from './sendbox-pdk.js';
export { handle } from './sendbox-pdk.js';

onWebhook(() => {
  const mode = config.get('mode', 'ok');
  if (mode === 'loop') {
    let n = 0;
    for (;;) n += 1;
  }
  if (mode === 'memory') {
    const hoard = [];
    for (;;) hoard.push(new Uint8Array(1 << 20).fill(1));
  }
  if (mode === 'huge') {
    return Outcome.email(new Email({ to: 'ok@example.com', subject: 'x'.repeat(20 << 20) }));
  }
  if (mode === 'throw') throw new Error('the plugin gave up on purpose');
  return Outcome.email(new Email({ to: 'ok@example.com', subject: 'ok' }));
});
