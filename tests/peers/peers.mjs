// Real protocol peers for sendbox's tests, on loopback:
//
// - an OAuth2 authorization server (oidc-provider): client credentials with a
//   client secret or a private_key_jwt assertion, the device authorization
//   grant with rotating refresh tokens, token introspection and revocation;
// - SMTP servers (smtp-server): STARTTLS + AUTH XOAUTH2 on one port, implicit
//   TLS on another, and one that offers no STARTTLS at all. Every bearer
//   token is checked against the authorization server's introspection
//   endpoint;
// - a control API the tests use to read what arrived and to make the SMTP
//   server misbehave (4xx/5xx replies, auth-failure styles, revocation).
//
// Started by tests/support/peers.rs; prints one JSON line with the addresses
// when ready, then serves until stdin closes or it is killed.
//
// Options (environment): ACCESS_TOKEN_TTL seconds (default 3600).

import './quiet.mjs'; // first: silences oidc-provider's dev notices before it loads
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createPublicKey, randomUUID } from 'node:crypto';

import Provider from 'oidc-provider';
import { SMTPServer } from 'smtp-server';

const ttl = Number(process.env.ACCESS_TOKEN_TTL || 3600);
const dir = mkdtempSync(join(tmpdir(), 'sendbox-peers-'));

// ---- certificates: a CA and a leaf for localhost/127.0.0.1 -----------------
function openssl(...args) {
  execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}
const f = (name) => join(dir, name);
openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2', '-subj', '/CN=sendbox test CA',
  '-keyout', f('ca.key'), '-out', f('ca.pem'),
  '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign');
openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-subj', '/CN=localhost', '-keyout', f('leaf.key'), '-out', f('leaf.csr'));
writeFileSync(f('leaf.ext'), [
  'basicConstraints=critical,CA:FALSE',
  'keyUsage=critical,digitalSignature,keyEncipherment',
  'extendedKeyUsage=serverAuth',
  'subjectAltName=DNS:localhost,IP:127.0.0.1',
].join('\n'));
openssl('x509', '-req', '-in', f('leaf.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial',
  '-days', '2', '-out', f('leaf.pem'), '-extfile', f('leaf.ext'));
// The client certificate for private_key_jwt (its thumbprint goes in x5t#S256).
openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=sendbox-cert client',
  '-keyout', f('client.key'), '-out', f('client.pem'));
const tls = {
  key: readFileSync(f('leaf.key')),
  cert: Buffer.concat([readFileSync(f('leaf.pem')), readFileSync(f('ca.pem'))]),
};

// ---- OAuth2 authorization server ---------------------------------------------
const secrets = {
  app: 'app-secret-' + randomUUID(),
  introspect: 'introspect-secret-' + randomUUID(),
};
const clientJwk = createPublicKey(readFileSync(f('client.key'))).export({ format: 'jwk' });

const oauthServer = http.createServer();
await new Promise((r) => oauthServer.listen(0, '127.0.0.1', r));
const issuer = `http://127.0.0.1:${oauthServer.address().port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'sendbox-app',
      client_secret: secrets.app,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_post',
      scope: 'smtp',
    },
    {
      client_id: 'sendbox-cert',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'private_key_jwt',
      token_endpoint_auth_signing_alg: 'RS256',
      jwks: { keys: [{ ...clientJwk, use: 'sig', alg: 'RS256' }] },
      scope: 'smtp',
    },
    {
      client_id: 'sendbox-device',
      grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'none',
      scope: 'openid offline_access smtp',
    },
    {
      client_id: 'smtp-server',
      client_secret: secrets.introspect,
      grant_types: [],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  scopes: ['openid', 'offline_access', 'smtp'],
  features: {
    clientCredentials: { enabled: true },
    deviceFlow: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    devInteractions: { enabled: true },
  },
  ttl: {
    AccessToken: ttl,
    ClientCredentials: ttl,
    DeviceCode: 600,
    Grant: 86400,
    Interaction: 600,
    RefreshToken: 86400,
    Session: 86400,
  },
  rotateRefreshToken: true,
  issueRefreshToken: async (ctx, client, code) =>
    client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
  findAccount: async (ctx, id) => ({ accountId: id, claims: async () => ({ sub: id }) }),
  // Consent is granted for whatever was asked: only the login is interactive.
  loadExistingGrant: async (ctx) => {
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid offline_access smtp');
    await grant.save();
    return grant;
  },
});
provider.on('server_error', (ctx, err) => console.error('oidc server_error', err));
let oauthDown = false;
let tokenRequests = 0;
// A switch for "the OAuth server is down": the socket stays, requests get 503.
const realHandler = provider.callback();
oauthServer.on('request', (req, res) => {
  if (oauthDown) {
    res.writeHead(503, { 'content-type': 'text/plain' });
    res.end('down for the test');
    return;
  }
  tokenRequests += req.url.startsWith('/token') ? 1 : 0;
  realHandler(req, res);
});

async function introspect(token) {
  const res = await fetch(`${issuer}/token/introspection`, {
    method: 'POST',
    headers: {
      'content-type': 'application/x-www-form-urlencoded',
      authorization: 'Basic ' + Buffer.from(`smtp-server:${secrets.introspect}`).toString('base64'),
    },
    body: new URLSearchParams({ token }),
  });
  return res.json();
}

// Approves a device code through the provider's own pages, like a person in
// a browser: enter the user code, log in, done.
async function approveDevice(userCode, login = 'operator@example.com') {
  const jar = new Map();
  const cookieHeader = () => [...jar].map(([k, v]) => `${k}=${v}`).join('; ');
  const keep = (res) => {
    for (const c of res.headers.getSetCookie()) {
      const [pair] = c.split(';');
      const i = pair.indexOf('=');
      jar.set(pair.slice(0, i), pair.slice(i + 1));
    }
  };
  const go = async (url, init = {}) => {
    if (process.env.PEERS_DEBUG) console.error("approve:", init.method || "GET", url, init.body ? String(init.body) : "");
    const res = await fetch(new URL(url, issuer), {
      ...init,
      redirect: 'manual',
      headers: { ...(init.headers || {}), cookie: cookieHeader() },
    });
    keep(res);
    return res;
  };
  const form = (obj) => ({
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams(obj),
  });
  let res = await go('/device');
  let html = await res.text();
  const xsrf = /name="xsrf" value="([^"]+)"/.exec(html)?.[1];
  if (!xsrf) throw new Error('no xsrf on the device page: ' + html.slice(0, 300));
  res = await go('/device', form({ xsrf, user_code: userCode }));
  // Follow redirects, logging in when the login form shows up.
  for (let i = 0; i < 20; i++) {
    if (res.status >= 300 && res.status < 400) {
      res = await go(res.headers.get('location'));
      continue;
    }
    html = await res.text();
    if (/name="login"/.test(html)) {
      const action = /action="([^"]+)"/.exec(html)[1];
      res = await go(action, form({ prompt: 'login', login, password: 'any' }));
      continue;
    }
    if (/op\.deviceConfirmForm/.test(html) && /<form[^>]*id="op\.deviceConfirmForm"/.test(html)) {
      // "Device Login Confirmation": submit its hidden fields (Continue).
      const formHtml = /<form[^>]*id="op\.deviceConfirmForm"[\s\S]*?<\/form>/.exec(html)[0];
      const action = /action="([^"]+)"/.exec(formHtml)[1];
      const fields = {};
      for (const m of formHtml.matchAll(/<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"/g)) fields[m[1]] = m[2];
      res = await go(action, form(fields));
      continue;
    }
    if (/name="prompt" value="consent"/.test(html)) {
      const action = /action="([^"]+)"/.exec(html)[1];
      res = await go(action, form({ prompt: 'consent' }));
      continue;
    }
    if (res.status === 200 && /Sign-in Success|success/i.test(html)) return { ok: true };
    throw new Error(`device approval stuck at ${res.status}: ${html.slice(0, 400)}`);
  }
  throw new Error('device approval: too many redirects');
}

// ---- SMTP servers ----------------------------------------------------------------
const received = [];
const seenTokens = [];
// Scripted misbehaviour, consumed in order: { stage: 'rcpt'|'data'|'mail', code, message, count },
// optionally only for one recipient ({ address }), or for 'data' a message that is stored and
// then answered only after { hold_ms } (a reply lost after DATA), or whose connection is cut
// once its content has arrived ({ drop: true }; not stored, no reply).
let faults = [];
let authStyle = 'challenge'; // 'challenge': 334 {json} then 535 (Gmail); 'direct': 535 5.7.3 (Microsoft)
let authAttempts = 0;
let activeConnections = 0;
let maxConnections = 0;
// Mail transactions begun, and those whose MAIL FROM reached us in the
// same read as a RCPT TO (pipelined, RFC 2920).
let mailCommands = 0;
let pipelinedTransactions = 0;
// Of those, the ones that came right after the end of the previous
// message's content, in the same read.
let pipelinedAfterContent = 0;
// Authenticated connections open now and at most, per mailbox: what a
// provider counts against its per-mailbox connection limit.
const activeByUser = {};
const maxByUser = {};

function takeFault(stage, address) {
  const f = faults.find(
    (x) => x.stage === stage && x.count > 0 && !x.hold_ms && !x.drop && (!x.address || x.address === address),
  );
  if (!f) return null;
  f.count -= 1;
  const err = new Error(f.message);
  err.responseCode = f.code;
  return err;
}

function smtpOptions(extra) {
  return {
    ...tls,
    authMethods: ['XOAUTH2'],
    banner: 'sendbox test peer',
    size: 50 * 1024 * 1024,
    onConnect(session, cb) {
      activeConnections += 1;
      session.countedConnection = true;
      maxConnections = Math.max(maxConnections, activeConnections);
      cb();
    },
    onClose(session) {
      // smtp-server also closes connections cut before `onConnect` ran
      // (a client killed right after connecting): count only ours.
      if (session && session.countedConnection) {
        session.countedConnection = false;
        activeConnections -= 1;
      }
      if (session && session.countedUser) activeByUser[session.countedUser] -= 1;
    },
    async onAuth(auth, session, cb) {
      authAttempts += 1;
      if (auth.method !== 'XOAUTH2') return cb(new Error('only XOAUTH2'));
      seenTokens.push(auth.accessToken);
      let info;
      try {
        info = await introspect(auth.accessToken);
      } catch (e) {
        const err = new Error('4.7.0 cannot check the token right now');
        err.responseCode = 454;
        return cb(err);
      }
      if (info.active && (info.scope || '').split(' ').includes('smtp')) {
        const user = auth.username;
        if (!session.countedUser) {
          session.countedUser = user;
          activeByUser[user] = (activeByUser[user] || 0) + 1;
          maxByUser[user] = Math.max(maxByUser[user] || 0, activeByUser[user]);
        }
        return cb(null, { user });
      }
      if (authStyle === 'challenge') {
        return cb(null, { data: { status: '401', schemes: 'bearer', scope: 'smtp' } });
      }
      const err = new Error('5.7.3 Authentication unsuccessful');
      err.responseCode = 535;
      return cb(err);
    },
    onSecure(socket, session, cb) {
      session.secureSocket = socket;
      // Watches what arrives in each read of the secured connection.
      socket.on('data', (chunk) => {
        const text = chunk.toString('latin1');
        if (/^MAIL FROM:/im.test(text) && /^RCPT TO:/im.test(text)) pipelinedTransactions += 1;
        if (/\r\n\.\r\nMAIL FROM:/i.test(text)) pipelinedAfterContent += 1;
      });
      cb();
    },
    onMailFrom(address, session, cb) {
      mailCommands += 1;
      cb(takeFault('mail'));
    },
    onRcptTo(address, session, cb) {
      cb(takeFault('rcpt', address.address));
    },
    onData(stream, session, cb) {
      const chunks = [];
      stream.on('data', (c) => chunks.push(c));
      stream.on('end', () => {
        // A `drop` fault: the connection is cut once the content has
        // arrived, before any reply (the client cannot know the outcome).
        const cut = faults.find((x) => x.stage === 'data' && x.count > 0 && x.drop);
        if (cut) {
          cut.count -= 1;
          (session.secureSocket || stream).destroy();
          return;
        }
        const fault = takeFault('data');
        if (fault) return cb(fault);
        const hold = faults.find((x) => x.stage === 'data' && x.count > 0 && x.hold_ms);
        if (hold) hold.count -= 1;
        received.push({
          id: received.length + 1,
          user: session.user,
          from: session.envelope.mailFrom && session.envelope.mailFrom.address,
          to: session.envelope.rcptTo.map((r) => r.address),
          raw: Buffer.concat(chunks).toString('utf8'),
          tls: Boolean(session.secure),
          at_ms: Date.now(),
        });
        if (hold) return setTimeout(() => cb(null, 'Message accepted late'), hold.hold_ms);
        cb(null, 'Message accepted');
      });
    },
    ...extra,
  };
}

async function listen(server) {
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return server.server.address().port;
}
const starttls = new SMTPServer(smtpOptions({ secure: false, allowInsecureAuth: false }));
const implicit = new SMTPServer(smtpOptions({ secure: true }));
const plain = new SMTPServer(smtpOptions({ secure: false, disabledCommands: ['STARTTLS'], allowInsecureAuth: true }));
for (const s of [starttls, implicit, plain]) s.on('error', (e) => console.error('smtp error', e.message));
const ports = {
  starttls: await listen(starttls),
  implicit: await listen(implicit),
  plain: await listen(plain),
};

// ---- control API -------------------------------------------------------------------
async function readJson(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  return chunks.length ? JSON.parse(Buffer.concat(chunks).toString('utf8')) : {};
}

const control = http.createServer(async (req, res) => {
  const reply = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  try {
    const url = new URL(req.url, 'http://x');
    if (req.method === 'GET' && url.pathname === '/messages') return reply(200, received);
    if (req.method === 'GET' && url.pathname === '/stats') {
      return reply(200, { authAttempts, tokenRequests, maxConnections, activeConnections, maxConnectionsByUser: maxByUser, seenTokens: seenTokens.length, messages: received.length, mailCommands, pipelinedTransactions, pipelinedAfterContent });
    }
    if (req.method === 'GET' && url.pathname === '/tokens') return reply(200, seenTokens);
    if (req.method === 'POST' && url.pathname === '/faults') {
      faults = (await readJson(req)).faults || [];
      return reply(200, { ok: true });
    }
    if (req.method === 'POST' && url.pathname === '/pipelining') {
      // Whether the SMTP servers offer PIPELINING in their EHLO replies.
      const hide = !(await readJson(req)).offer;
      for (const server of [starttls, implicit, plain]) server.options.hidePIPELINING = hide;
      return reply(200, { ok: true });
    }
    if (req.method === 'POST' && url.pathname === '/auth-style') {
      authStyle = (await readJson(req)).style;
      return reply(200, { ok: true });
    }
    if (req.method === 'POST' && url.pathname === '/oauth-down') {
      oauthDown = Boolean((await readJson(req)).down);
      return reply(200, { ok: true });
    }
    if (req.method === 'POST' && url.pathname === '/reset') {
      received.length = 0;
      seenTokens.length = 0;
      faults = [];
      authAttempts = 0;
      tokenRequests = 0;
      mailCommands = 0;
      pipelinedTransactions = 0;
      pipelinedAfterContent = 0;
      for (const server of [starttls, implicit, plain]) server.options.hidePIPELINING = false;
      maxConnections = activeConnections;
      for (const u of Object.keys(maxByUser)) maxByUser[u] = activeByUser[u] || 0;
      return reply(200, { ok: true });
    }
    if (req.method === 'POST' && url.pathname === '/revoke-last-token') {
      // Revokes the last access token the SMTP server saw, through the
      // provider's revocation endpoint, as its owning client.
      const token = seenTokens[seenTokens.length - 1];
      if (!token) return reply(409, { error: 'no token seen yet' });
      const r = await fetch(`${issuer}/token/revocation`, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({ token, client_id: 'sendbox-app', client_secret: secrets.app }),
      });
      return reply(r.ok ? 200 : 502, { status: r.status });
    }
    if (req.method === 'POST' && url.pathname === '/approve-device') {
      const { user_code, login } = await readJson(req);
      return reply(200, await approveDevice(user_code, login));
    }
    reply(404, { error: `no route ${req.method} ${url.pathname}` });
  } catch (e) {
    reply(500, { error: String(e && e.stack || e) });
  }
});
await new Promise((r) => control.listen(0, '127.0.0.1', r));

process.stdout.write(JSON.stringify({
  issuer,
  token_endpoint: `${issuer}/token`,
  device_endpoint: `${issuer}/device/auth`,
  smtp_starttls_port: ports.starttls,
  smtp_implicit_tls_port: ports.implicit,
  smtp_no_starttls_port: ports.plain,
  control: `http://127.0.0.1:${control.address().port}`,
  ca_file: f('ca.pem'),
  client_key_file: f('client.key'),
  client_cert_file: f('client.pem'),
  // The localhost certificate (signed by ca_file), for servers under test.
  leaf_cert_file: f('leaf.pem'),
  leaf_key_file: f('leaf.key'),
  clients: {
    secret: { client_id: 'sendbox-app', client_secret: secrets.app },
    cert: { client_id: 'sendbox-cert' },
    device: { client_id: 'sendbox-device' },
  },
}) + '\n');

// Exit when the test that started us goes away.
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
