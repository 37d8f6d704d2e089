// Write sendbox plugins in JavaScript (ES modules).
//
// A plugin is a module `app.js` that registers a function for each kind of
// event it handles and re-exports `handle`:
//
//     import { Email, Outcome, config, onFile } from './sendbox-pdk.js';
//     export { handle } from './sendbox-pdk.js';
//
//     onFile((file) => Outcome.email(new Email({
//       to: config.require('to'), subject: `New file: ${file.path}`,
//     })));
//
// built with `sendbox plugin build`, or `componentize-js app.js --wit wit
// -n hook -d http fetch-event -o app.wasm` (no HTTP: a plugin has no
// network). Events with no registered function get an empty outcome
// (nothing sent, `202` for a webhook). Throwing commits nothing: no email,
// no state write; the error's text is the reason the host logs (a webhook
// gets `500`). A plugin never sees a token, a secret, the filesystem, the
// network or the environment.
//
// This module owns the guest side of `wit/sendbox.wit` for JavaScript and
// hides the generated bindings; it must not know how the host stores,
// checks or sends what a plugin returns.

import { log as hostLog, config as hostConfig } from 'sendbox:plugin/host@0.1.0';
import * as hostState from 'sendbox:plugin/state@0.1.0';

const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

function addresses(value) {
  if (value === undefined || value === null) return [];
  if (typeof value === 'string') return value.split(',').map((a) => a.trim()).filter((a) => a);
  return [...value];
}

function bytes(data) {
  return typeof data === 'string' ? encoder.encode(data) : new Uint8Array(data);
}

/** One email to send. `to`, `cc` and `bcc` take an address, a
 * comma-separated string or an array. */
export class Email {
  constructor({ to, subject = '', text, html, cc, bcc, from, replyTo, headers, idempotencyKey } = {}) {
    this.to = addresses(to);
    this.cc = addresses(cc);
    this.bcc = addresses(bcc);
    this.subject = subject;
    this.text = text;
    this.html = html;
    this.from = from;
    this.replyTo = replyTo;
    this.headers = [...(headers ?? [])];
    this.idempotencyKey = idempotencyKey;
    this.attachments = [];
  }

  /** Adds an attachment (`data`: bytes, or text as UTF-8). */
  attach(filename, contentType, data) {
    this.attachments.push({ filename, contentType, data: bytes(data) });
    return this;
  }

  toWit() {
    return {
      to: this.to, cc: this.cc, bcc: this.bcc, sender: this.from, replyTo: this.replyTo,
      subject: this.subject, text: this.text, html: this.html, attachments: this.attachments,
      headers: this.headers.map(([k, v]) => [String(k), String(v)]),
      idempotencyKey: this.idempotencyKey,
    };
  }
}

/** A webhook's HTTP answer. */
export const Response = {
  text(status, body) {
    return { status, headers: [['content-type', 'text/plain; charset=utf-8']], body: bytes(body) };
  },
  json(status, value) {
    return { status, headers: [['content-type', 'application/json']], body: bytes(JSON.stringify(value)) };
  },
};

/** What the plugin wants done: emails, and for a webhook an answer. */
export const Outcome = {
  none: () => ({ emails: [], response: undefined }),
  email: (email) => ({ emails: [email], response: undefined }),
  emails: (emails) => ({ emails: [...emails], response: undefined }),
  respond: (response) => ({ emails: [], response }),
};

/** The plugin's `[plugins.NAME.config]` values (never secrets). */
export const config = {
  get(key, fallback) {
    const value = hostConfig(key);
    return value === undefined ? fallback : value;
  },
  require(key) {
    const value = hostConfig(key);
    if (value === undefined) throw new Error(`config \`${key}\` is missing: set it in [plugins.NAME.config]`);
    return value;
  },
};

/** Lines in the host's log, tagged with the plugin and event ids. */
export const log = {
  debug: (m) => hostLog('debug', String(m)),
  info: (m) => hostLog('info', String(m)),
  warn: (m) => hostLog('warn', String(m)),
  error: (m) => hostLog('error', String(m)),
};

/** The plugin's private key-value store, committed with the outcome. */
export const state = {
  get: (key) => hostState.get(key),
  set: (key, value) => hostState.set(key, bytes(value)),
  delete: (key) => hostState.delete(key),
  keys: (prefix = '') => hostState.keys(prefix),
  getJson(key) {
    const raw = hostState.get(key);
    return raw === undefined ? undefined : JSON.parse(decoder.decode(raw));
  },
  setJson: (key, value) => hostState.set(key, bytes(JSON.stringify(value))),
};

function request(raw) {
  const body = raw.body;
  return {
    method: raw.method,
    path: raw.path,
    query: raw.query,
    headers: raw.headers,
    body,
    header(name) {
      const found = raw.headers.find(([k]) => k.toLowerCase() === name.toLowerCase());
      return found ? found[1] : undefined;
    },
    text() {
      return decoder.decode(body);
    },
    json() {
      try {
        return JSON.parse(decoder.decode(body));
      } catch (e) {
        throw new Error(`the body is not JSON: ${e.message}`);
      }
    },
  };
}

function fileEvent(raw) {
  return {
    watch: raw.watch,
    path: raw.path,
    change: raw.change,
    size: raw.size === undefined ? undefined : Number(raw.size),
    contents: raw.contents,
  };
}

const handlers = {};
/** Registers `fn(request) -> Outcome` for webhooks. */
export const onWebhook = (fn) => { handlers.webhook = fn; };
/** Registers `fn(file) -> Outcome` for file changes. */
export const onFile = (fn) => { handlers.file = fn; };
/** Registers `fn(tick) -> Outcome` for schedules. */
export const onSchedule = (fn) => { handlers.schedule = fn; };

function toWit(outcome) {
  const o = outcome ?? Outcome.none();
  return {
    emails: (o.emails ?? []).map((e) => (e instanceof Email ? e.toWit() : new Email(e).toWit())),
    response: o.response,
  };
}

/** The export componentize-js builds: re-export it from `app.js`. */
export function handle(event) {
  const fn = handlers[event.tag];
  if (!fn) return toWit(Outcome.none());
  let arg;
  if (event.tag === 'webhook') arg = request(event.val);
  else if (event.tag === 'file') arg = fileEvent(event.val);
  else arg = { schedule: event.val.schedule, scheduledAtMs: Number(event.val.scheduledAtMs) };
  try {
    return toWit(fn(arg));
  } catch (e) {
    // The reason the host logs; nothing is committed.
    throw `${e?.name ?? 'Error'}: ${e?.message ?? String(e)}`;
  }
}
