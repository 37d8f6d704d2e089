// file-alert, in JavaScript: a created or modified file becomes an email
// with the file attached — the same emails as the Rust `file-alert`.
//
// Config (all under `[plugins.<name>.config]`):
// - `to` (required): recipient, or several separated by commas.
// - `subject`: template; `{path}`, `{watch}`, `{change}` and `{size}` are
//   replaced. Default `[{watch}] {path} {change}`.
// - `max_attachment_bytes`: larger files are described, not attached.
//   Default 5242880 (5 MiB).
// - `notify_removed`: `true` to also mail when a file is removed.
//
// `./sendbox-pdk.js` is the JavaScript SDK (`sdk/js`), copied beside this
// file when it is built.

import { Email, Outcome, config, log, onFile } from './sendbox-pdk.js';
export { handle } from './sendbox-pdk.js';

const DEFAULT_SUBJECT = '[{watch}] {path} {change}';
const DEFAULT_MAX_ATTACHMENT_BYTES = 5 * 1024 * 1024;

const TYPES = {
  txt: 'text/plain', log: 'text/plain', csv: 'text/csv', json: 'application/json',
  xml: 'application/xml', html: 'text/html', htm: 'text/html', pdf: 'application/pdf',
  png: 'image/png', jpg: 'image/jpeg', jpeg: 'image/jpeg', gif: 'image/gif',
  zip: 'application/zip', gz: 'application/gzip',
};

function parsed(key, parse, fallback) {
  const raw = config.get(key);
  if (raw === undefined) return fallback;
  const value = parse(raw.trim());
  if (value === undefined) throw new Error(`config \`${key}\`: cannot parse ${JSON.stringify(raw)}`);
  return value;
}

const integer = (s) => (/^\d+$/.test(s) ? Number(s) : undefined);
const boolean = (s) => ({ true: true, false: false })[s];

function fileName(path) {
  const name = path.split('/').pop();
  return name ? name : 'file';
}

function contentType(name) {
  const dot = name.lastIndexOf('.');
  return dot < 0 ? 'application/octet-stream' : TYPES[name.slice(dot + 1).toLowerCase()] ?? 'application/octet-stream';
}

onFile((file) => {
  const to = config.get('to');
  if (to === undefined) throw new Error('config `to` is missing: set the recipient address');
  const max = parsed('max_attachment_bytes', integer, DEFAULT_MAX_ATTACHMENT_BYTES);
  const notifyRemoved = parsed('notify_removed', boolean, false);
  if (file.change === 'removed' && !notifyRemoved) {
    log.debug(`${file.path} removed; notify_removed is off`);
    return Outcome.none();
  }
  const size = file.size ?? file.contents?.length;
  const subject = config.get('subject', DEFAULT_SUBJECT)
    .replaceAll('{path}', file.path)
    .replaceAll('{watch}', file.watch)
    .replaceAll('{change}', file.change)
    .replaceAll('{size}', size === undefined ? '' : String(size))
    .replace(/[\r\n]/g, ' ');
  const name = fileName(file.path);
  const [first, ...rest] = to.split(',');
  const email = new Email({
    to: [first.trim(), ...rest.map((r) => r.trim()).filter((r) => r)],
    subject,
  });
  let body = `File ${file.change} in watch "${file.watch}": ${file.path}\n`;
  if (size !== undefined) body += `Size: ${size} bytes\n`;
  if (file.contents !== undefined && file.contents.length <= max) {
    body += `The file is attached as ${name}.\n`;
    email.attach(name, contentType(name), file.contents);
  } else if (file.contents !== undefined) {
    body += `Not attached: ${file.contents.length} bytes is over the ${max}-byte limit (max_attachment_bytes).\n`;
  } else if (file.change !== 'removed') {
    body += 'Not attached: the host did not pass the contents (too large or not readable).\n';
  }
  email.text = body;
  return Outcome.email(email);
});
