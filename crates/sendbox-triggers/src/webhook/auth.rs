//! Who may call a webhook route: signature schemes, bearer tokens and the
//! replay window.
//!
//! Schemes, all HMAC-SHA256 compared in constant time:
//! - [`Auth::Hmac`]: GitHub style, `X-Hub-Signature-256: sha256=<hex>` over
//!   the body only. Nothing dates the request, so a captured request can be
//!   replayed for ever; a route can refuse a sender's delivery id seen
//!   before (`dedupe_header`, e.g. `X-GitHub-Delivery`).
//! - [`Auth::StandardWebhooks`]: `webhook-id`, `webhook-timestamp` and
//!   `webhook-signature: v1,<base64>` over `id.timestamp.body`, secret
//!   `whsec_<base64>` (standardwebhooks.com).
//! - [`Auth::Stripe`]: `Stripe-Signature: t=<ts>,v1=<hex>` over `ts.body`.
//! - [`Auth::Slack`]: `X-Slack-Request-Timestamp` and
//!   `X-Slack-Signature: v0=<hex>` over `v0:ts:body`.
//!
//! Timestamped schemes refuse a timestamp outside the route's tolerance and
//! a delivery seen within it (its id, or for Stripe and Slack, which send
//! none, its signature).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use base64::Engine as _;

/// How a route authenticates callers.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// No authentication (only sensible on loopback).
    None,
    /// HMAC-SHA256 of the body with `secret`, hex, in `header` after
    /// `prefix` (e.g. `X-Hub-Signature-256: sha256=...`).
    Hmac {
        /// The shared secret.
        secret: Vec<u8>,
        /// Header name, lower-case.
        header: String,
        /// Prefix before the hex digest, e.g. `sha256=`.
        prefix: String,
    },
    /// Standard Webhooks: the key is the base64 part of `whsec_...`.
    StandardWebhooks {
        /// The decoded key.
        secret: Vec<u8>,
    },
    /// Stripe's `Stripe-Signature`: the key is the secret as written.
    Stripe {
        /// The signing secret.
        secret: Vec<u8>,
    },
    /// Slack's `X-Slack-Signature`: the key is the signing secret.
    Slack {
        /// The signing secret.
        secret: Vec<u8>,
    },
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The expected token.
        token: Vec<u8>,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Hmac { header, prefix, .. } => write!(
                f,
                "Hmac {{ header: {header}, prefix: {prefix}, secret: [redacted] }}"
            ),
            Auth::StandardWebhooks { .. } => f.write_str("StandardWebhooks { secret: [redacted] }"),
            Auth::Stripe { .. } => f.write_str("Stripe { secret: [redacted] }"),
            Auth::Slack { .. } => f.write_str("Slack { secret: [redacted] }"),
            Auth::Bearer { .. } => f.write_str("Bearer { token: [redacted] }"),
        }
    }
}

impl Auth {
    /// A short description for `sendbox check`.
    pub fn describe(&self) -> String {
        match self {
            Auth::None => "unauthenticated".to_owned(),
            Auth::Hmac { header, .. } => format!("HMAC-SHA256 in {header}"),
            Auth::StandardWebhooks { .. } => "Standard Webhooks signature".to_owned(),
            Auth::Stripe { .. } => "Stripe-Signature".to_owned(),
            Auth::Slack { .. } => "X-Slack-Signature".to_owned(),
            Auth::Bearer { .. } => "bearer token".to_owned(),
        }
    }

    /// Headers that carry credentials; the plugin never sees them.
    pub(crate) fn hidden_header(&self) -> Option<&str> {
        match self {
            Auth::Hmac { header, .. } => Some(header),
            Auth::StandardWebhooks { .. } => Some("webhook-signature"),
            Auth::Stripe { .. } => Some("stripe-signature"),
            Auth::Slack { .. } => Some("x-slack-signature"),
            Auth::None | Auth::Bearer { .. } => None,
        }
    }
}

/// Replay protection for one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// Timestamped schemes: how far a request's timestamp may be from now.
    pub tolerance: Duration,
    /// Body-only schemes: a header with the sender's delivery id (lower
    /// case), refused when seen within `dedupe_window`.
    pub dedupe_header: Option<String>,
    /// How long a delivery id from `dedupe_header` is remembered.
    pub dedupe_window: Duration,
}

impl Default for Replay {
    fn default() -> Self {
        Replay {
            tolerance: Duration::from_secs(300),
            dedupe_header: None,
            dedupe_window: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why a request was not authenticated. The text is safe to send back.
pub type Refusal = &'static str;

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, Refusal> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or(match name {
            "authorization" => "missing bearer token",
            _ => "missing signature header",
        })
}

fn now_secs() -> i64 {
    sendbox_types::now_ms() / 1000
}

fn timestamp(value: &str, tolerance: Duration) -> Result<i64, Refusal> {
    let ts: i64 = value.trim().parse().map_err(|_| "malformed timestamp")?;
    if now_secs().abs_diff(ts) > tolerance.as_secs() {
        return Err("timestamp outside the tolerance window");
    }
    Ok(ts)
}

fn hmac_matches(secret: &[u8], parts: &[&[u8]], given: &[u8]) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut cx = ring::hmac::Context::with_key(&key);
    for p in parts {
        cx.update(p);
    }
    let tag = cx.sign();
    // Constant time: compare HMACs of both under a one-off key.
    constant_time_eq(tag.as_ref(), given)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let rng = ring::rand::SystemRandom::new();
    let Ok(key) = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng) else {
        return false;
    };
    let expected = ring::hmac::sign(&key, a);
    ring::hmac::verify(&key, b, expected.as_ref()).is_ok()
}

/// What can be checked before the body is read: the credential headers are
/// there and well-formed, a bearer token is right, a timestamp is inside
/// the window. Strangers are turned away here without holding a body.
pub(crate) fn precheck(auth: &Auth, replay: &Replay, headers: &HeaderMap) -> Result<(), Refusal> {
    match auth {
        Auth::None => Ok(()),
        Auth::Bearer { .. } => verify(auth, replay, headers, b"").map(|_| ()),
        Auth::Hmac { header: h, .. } => header(headers, h).map(|_| ()),
        Auth::StandardWebhooks { .. } => {
            header(headers, "webhook-id")?;
            header(headers, "webhook-signature")?;
            timestamp(header(headers, "webhook-timestamp")?, replay.tolerance).map(|_| ())
        }
        Auth::Stripe { .. } => {
            let (ts, _) = stripe_parts(header(headers, "stripe-signature")?)?;
            timestamp(ts, replay.tolerance).map(|_| ())
        }
        Auth::Slack { .. } => {
            header(headers, "x-slack-signature")?;
            timestamp(
                header(headers, "x-slack-request-timestamp")?,
                replay.tolerance,
            )
            .map(|_| ())
        }
    }
}

fn stripe_parts(value: &str) -> Result<(&str, Vec<&str>), Refusal> {
    let mut ts = None;
    let mut sigs = Vec::new();
    for part in value.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => ts = Some(v),
            Some(("v1", v)) => sigs.push(v),
            _ => {}
        }
    }
    match ts {
        Some(ts) if !sigs.is_empty() => Ok((ts, sigs)),
        _ => Err("malformed signature"),
    }
}

/// Longest delivery id remembered; longer ones are refused.
const MAX_DELIVERY_ID_BYTES: usize = 256;

/// Checks a request's credentials against its body. On success returns
/// the delivery's id for the replay window (with how long to keep it), if
/// the scheme or route has one.
pub(crate) fn verify(
    auth: &Auth,
    replay: &Replay,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<(String, Duration)>, Refusal> {
    let window = replay.tolerance * 2;
    let delivery = match auth {
        Auth::None => None,
        Auth::Bearer { token } => {
            let given = header(headers, "authorization")?
                .strip_prefix("Bearer ")
                .ok_or("missing bearer token")?;
            if !constant_time_eq(token, given.as_bytes()) {
                return Err("bad bearer token");
            }
            None
        }
        Auth::Hmac {
            secret,
            header: h,
            prefix,
        } => {
            let given = header(headers, h)?
                .strip_prefix(prefix.as_str())
                .ok_or("malformed signature")?;
            let sig = hex::decode(given.trim()).map_err(|_| "malformed signature")?;
            if !hmac_matches(secret, &[body], &sig) {
                return Err("bad signature");
            }
            match &replay.dedupe_header {
                Some(name) => Some((
                    header(headers, name)
                        .map_err(|_| "missing delivery id header")?
                        .to_owned(),
                    replay.dedupe_window,
                )),
                None => None,
            }
        }
        Auth::StandardWebhooks { secret } => {
            let id = header(headers, "webhook-id")?;
            let ts = header(headers, "webhook-timestamp")?;
            timestamp(ts, replay.tolerance)?;
            let signed = [id.as_bytes(), b".", ts.trim().as_bytes(), b".", body];
            // Several signatures may be sent (during key rotation).
            let ok = header(headers, "webhook-signature")?
                .split(' ')
                .filter_map(|s| s.strip_prefix("v1,"))
                .filter_map(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .any(|sig| hmac_matches(secret, &signed, &sig));
            if !ok {
                return Err("bad signature");
            }
            Some((id.to_owned(), window))
        }
        Auth::Stripe { secret } => {
            let (ts, sigs) = stripe_parts(header(headers, "stripe-signature")?)?;
            timestamp(ts, replay.tolerance)?;
            let signed = [ts.as_bytes(), b".", body];
            let matched = sigs
                .into_iter()
                .find(|s| hex::decode(s).is_ok_and(|sig| hmac_matches(secret, &signed, &sig)));
            // No id is sent: the signature names this exact delivery.
            Some((matched.ok_or("bad signature")?.to_owned(), window))
        }
        Auth::Slack { secret } => {
            let ts = header(headers, "x-slack-request-timestamp")?;
            timestamp(ts, replay.tolerance)?;
            let given = header(headers, "x-slack-signature")?
                .strip_prefix("v0=")
                .ok_or("malformed signature")?;
            let sig = hex::decode(given.trim()).map_err(|_| "malformed signature")?;
            if !hmac_matches(secret, &[b"v0:", ts.trim().as_bytes(), b":", body], &sig) {
                return Err("bad signature");
            }
            Some((given.to_owned(), window))
        }
    };
    if delivery
        .as_ref()
        .is_some_and(|(id, _)| id.is_empty() || id.len() > MAX_DELIVERY_ID_BYTES)
    {
        return Err("delivery id must be 1 to 256 bytes");
    }
    Ok(delivery)
}

/// Where a delivery id stands in the replay window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// First time: now recorded as in flight.
    New,
    /// Being handled right now.
    InFlight,
    /// Handled and acknowledged already.
    Accepted,
    /// The window holds as many ids as it may; try later.
    Full,
}

/// Most delivery ids one route remembers. Only authenticated deliveries
/// are recorded, so only the sender can fill it.
const MAX_SEEN: usize = 100_000;

/// Delivery ids seen by one route, each until its window ends.
#[derive(Default)]
pub(crate) struct SeenIds(Mutex<HashMap<String, (Instant, bool)>>);

impl SeenIds {
    /// Records `id` as in flight unless it was seen within its window.
    pub(crate) fn begin(&self, id: &str, keep: Duration) -> Seen {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some((until, accepted)) = map.get(id)
            && *until > now
        {
            return if *accepted {
                Seen::Accepted
            } else {
                Seen::InFlight
            };
        }
        if map.len() >= MAX_SEEN {
            map.retain(|_, (until, _)| *until > now);
            if map.len() >= MAX_SEEN {
                return Seen::Full;
            }
        }
        map.insert(id.to_owned(), (now + keep, false));
        Seen::New
    }

    /// The delivery was acknowledged: a repeat is a duplicate.
    pub(crate) fn accept(&self, id: &str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = map.get_mut(id) {
            entry.1 = true;
        }
    }

    /// The delivery failed: the sender may try it again.
    pub(crate) fn forget(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, v.parse().unwrap());
        }
        h
    }

    fn hmac_hex(secret: &[u8], data: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        hex::encode(ring::hmac::sign(&key, data).as_ref())
    }

    #[test]
    fn hmac_and_bearer() {
        let secret = b"s3cret".to_vec();
        let auth = Auth::Hmac {
            secret: secret.clone(),
            header: "x-hub-signature-256".into(),
            prefix: "sha256=".into(),
        };
        let r = Replay::default();
        let sig = hmac_hex(&secret, b"body");
        let h = headers(&[("x-hub-signature-256", format!("sha256={sig}"))]);
        assert_eq!(verify(&auth, &r, &h, b"body"), Ok(None));
        assert_eq!(verify(&auth, &r, &h, b"other"), Err("bad signature"));
        assert_eq!(
            verify(&auth, &r, &HeaderMap::new(), b"body"),
            Err("missing signature header")
        );
        let dedupe = Replay {
            dedupe_header: Some("x-github-delivery".into()),
            ..Replay::default()
        };
        assert_eq!(
            verify(&auth, &dedupe, &h, b"body"),
            Err("missing delivery id header")
        );
        let bearer = Auth::Bearer {
            token: b"tok".to_vec(),
        };
        let h = headers(&[("authorization", "Bearer tok".into())]);
        assert!(precheck(&bearer, &r, &h).is_ok());
        let h = headers(&[("authorization", "Bearer nope".into())]);
        assert_eq!(precheck(&bearer, &r, &h), Err("bad bearer token"));
    }

    #[test]
    fn standard_webhooks_signature_and_window() {
        let key = b"a very secret key".to_vec();
        let auth = Auth::StandardWebhooks {
            secret: key.clone(),
        };
        let r = Replay::default();
        let ts = now_secs().to_string();
        let sign = |ts: &str, body: &[u8]| {
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
            let mut cx = ring::hmac::Context::with_key(&k);
            cx.update(format!("msg_1.{ts}.").as_bytes());
            cx.update(body);
            base64::engine::general_purpose::STANDARD.encode(cx.sign().as_ref())
        };
        let h = headers(&[
            ("webhook-id", "msg_1".into()),
            ("webhook-timestamp", ts.clone()),
            (
                "webhook-signature",
                format!("v1,bm90IGl0 v1,{}", sign(&ts, b"{}")),
            ),
        ]);
        assert_eq!(
            verify(&auth, &r, &h, b"{}"),
            Ok(Some(("msg_1".into(), r.tolerance * 2)))
        );
        assert_eq!(verify(&auth, &r, &h, b"{ }"), Err("bad signature"));
        let old = (now_secs() - 301).to_string();
        let h = headers(&[
            ("webhook-id", "msg_1".into()),
            ("webhook-timestamp", old.clone()),
            ("webhook-signature", format!("v1,{}", sign(&old, b"{}"))),
        ]);
        assert_eq!(
            precheck(&auth, &r, &h),
            Err("timestamp outside the tolerance window")
        );
    }

    #[test]
    fn stripe_and_slack() {
        let secret = b"whsec_stripe".to_vec();
        let r = Replay::default();
        let ts = now_secs().to_string();
        let sig = hmac_hex(&secret, format!("{ts}.body").as_bytes());
        let h = headers(&[("stripe-signature", format!("t={ts},v1={sig},v0=00"))]);
        let auth = Auth::Stripe {
            secret: secret.clone(),
        };
        assert_eq!(
            verify(&auth, &r, &h, b"body"),
            Ok(Some((sig.clone(), r.tolerance * 2)))
        );
        assert_eq!(verify(&auth, &r, &h, b"bodx"), Err("bad signature"));

        let auth = Auth::Slack {
            secret: secret.clone(),
        };
        let sig = hmac_hex(&secret, format!("v0:{ts}:body").as_bytes());
        let h = headers(&[
            ("x-slack-request-timestamp", ts.clone()),
            ("x-slack-signature", format!("v0={sig}")),
        ]);
        assert!(verify(&auth, &r, &h, b"body").is_ok());
        assert_eq!(verify(&auth, &r, &h, b"b0dy"), Err("bad signature"));
    }

    #[test]
    fn seen_ids_refuse_repeats_until_forgotten() {
        let seen = SeenIds::default();
        let keep = Duration::from_secs(60);
        assert_eq!(seen.begin("a", keep), Seen::New);
        assert_eq!(seen.begin("a", keep), Seen::InFlight);
        seen.accept("a");
        assert_eq!(seen.begin("a", keep), Seen::Accepted);
        assert_eq!(seen.begin("b", keep), Seen::New);
        seen.forget("b");
        assert_eq!(seen.begin("b", keep), Seen::New);
        // Expired ids are forgotten.
        assert_eq!(seen.begin("c", Duration::ZERO), Seen::New);
        assert_eq!(seen.begin("c", keep), Seen::New);
    }
}
