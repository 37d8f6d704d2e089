//! Local users and their password hashes; failed logins per client address.
//!
//! Hashes are PBKDF2-HMAC-SHA256, written
//! `$pbkdf2-sha256$<iterations>$<salt base64>$<hash base64>` (what
//! `sendbox hash-password` prints). A device logs in on every connection:
//! after one successful check, the same password is recognised by a keyed
//! hash kept in memory (one HMAC), not by another key derivation. Checks
//! run on blocking threads, at most two at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use ring::{hmac, pbkdf2, rand::SecureRandom};

const PREFIX: &str = "$pbkdf2-sha256$";

/// Iterations for new hashes (OWASP's 2023 figure for PBKDF2-SHA256).
pub const ITERATIONS: u32 = 600_000;

/// The fewest iterations a configured hash may have.
const MIN_ITERATIONS: u32 = 10_000;

/// A password hash that does not parse, or a users file line that does not.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct UsersError(pub String);

/// One user's password hash.
#[derive(Clone)]
pub struct PasswordHash {
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PasswordHash(pbkdf2-sha256, {} iterations)",
            self.iterations
        )
    }
}

impl PasswordHash {
    /// Hashes `password` with a fresh random salt; the text to store.
    pub fn create(password: &str) -> Result<String, UsersError> {
        let mut salt = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| UsersError("no randomness for the salt".into()))?;
        let mut hash = [0u8; 32];
        let iterations = NonZeroU32::new(ITERATIONS).unwrap_or(NonZeroU32::MIN);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            password.as_bytes(),
            &mut hash,
        );
        Ok(format!(
            "{PREFIX}{ITERATIONS}${}${}",
            B64.encode(salt),
            B64.encode(hash)
        ))
    }

    /// Reads a stored hash.
    pub fn parse(text: &str) -> Result<PasswordHash, UsersError> {
        let bad = |why: &str| {
            UsersError(format!(
                "not a password hash ({why}); make one with `sendbox hash-password`"
            ))
        };
        let rest = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("it must start with $pbkdf2-sha256$"))?;
        let mut parts = rest.split('$');
        let (Some(iter), Some(salt), Some(hash), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected $pbkdf2-sha256$ITERATIONS$SALT$HASH"));
        };
        let iterations: u32 = iter
            .parse()
            .map_err(|_| bad("the iteration count is not a number"))?;
        if iterations < MIN_ITERATIONS {
            return Err(bad(&format!(
                "{iterations} iterations is too few; at least {MIN_ITERATIONS}"
            )));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| bad("the salt is not base64"))?;
        let hash = B64
            .decode(hash)
            .map_err(|_| bad("the hash is not base64"))?;
        if salt.len() < 8 || hash.len() != 32 {
            return Err(bad("salt of at least 8 bytes and a 32-byte hash expected"));
        }
        Ok(PasswordHash {
            iterations: NonZeroU32::new(iterations).ok_or_else(|| bad("zero iterations"))?,
            salt,
            hash,
        })
    }

    /// Whether `password` matches, in constant time.
    pub fn verify(&self, password: &str) -> bool {
        pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA256,
            self.iterations,
            &self.salt,
            password.as_bytes(),
            &self.hash,
        )
        .is_ok()
    }
}

/// The users who may log in to a listener.
pub struct Users {
    hashes: HashMap<String, PasswordHash>,
    /// Checked against when the user is unknown, so that takes as long.
    decoy: PasswordHash,
    /// Per user, a keyed hash of the last password that checked out.
    remembered: Mutex<HashMap<String, Vec<u8>>>,
    key: hmac::Key,
    checks: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.hashes.keys().collect();
        names.sort();
        f.debug_struct("Users").field("names", &names).finish()
    }
}

impl Users {
    /// Users from `name:hash` lines (blank lines and `#` comments
    /// ignored); an error names the line.
    pub fn parse(text: &str) -> Result<Users, UsersError> {
        let mut hashes = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |e: UsersError| UsersError(format!("line {}: {e}", i + 1));
            let (name, hash) = line
                .split_once(':')
                .ok_or_else(|| at(UsersError("expected NAME:HASH".into())))?;
            let name = name.trim();
            if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
                return Err(at(UsersError(
                    "the user name is empty, too long or has control characters".into(),
                )));
            }
            if hashes
                .insert(name.to_owned(), PasswordHash::parse(hash).map_err(at)?)
                .is_some()
            {
                return Err(at(UsersError(format!("user `{name}` is listed twice"))));
            }
        }
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| UsersError("no randomness for the key".into()))?;
        let decoy = PasswordHash {
            iterations: NonZeroU32::new(ITERATIONS).unwrap_or(NonZeroU32::MIN),
            salt: vec![0; 16],
            hash: vec![0; 32],
        };
        Ok(Users {
            hashes,
            decoy,
            remembered: Mutex::new(HashMap::new()),
            key,
            checks: tokio::sync::Semaphore::new(2),
        })
    }

    /// How many users.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether `user` logs in with `password`.
    pub async fn check(self: &std::sync::Arc<Self>, user: &str, password: &str) -> bool {
        let tag = hmac::sign(&self.key, password.as_bytes()).as_ref().to_vec();
        let known = self
            .remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(user)
            .is_some_and(|t| hmac::verify(&self.key, password.as_bytes(), t).is_ok());
        if known {
            return true;
        }
        let Ok(_permit) = self.checks.acquire().await else {
            return false;
        };
        let (me, user_owned, password) = (self.clone(), user.to_owned(), password.to_owned());
        let ok = tokio::task::spawn_blocking(move || match me.hashes.get(&user_owned) {
            Some(h) => h.verify(&password),
            None => {
                let _ = me.decoy.verify(&password);
                false
            }
        })
        .await
        .unwrap_or(false);
        if ok {
            self.remembered
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(user.to_owned(), tag);
        }
        ok
    }
}

/// Failed logins per client address: past `max` within `window`, the
/// address is refused until the window has passed. Holds at most
/// [`LoginLimiter::MAX_TRACKED`] addresses.
pub struct LoginLimiter {
    max: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl LoginLimiter {
    /// The most client addresses remembered at once.
    pub const MAX_TRACKED: usize = 10_000;

    /// A limiter allowing `max` failures per `window`.
    pub fn new(max: u32, window: Duration) -> LoginLimiter {
        LoginLimiter {
            max,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` is refused now.
    pub fn locked(&self, ip: IpAddr) -> bool {
        let map = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&ip)
            .is_some_and(|(n, since)| *n >= self.max && since.elapsed() < self.window)
    }

    /// Counts a failure; whether `ip` is now refused.
    pub fn failed(&self, ip: IpAddr) -> bool {
        let mut map = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= Self::MAX_TRACKED && !map.contains_key(&ip) {
            let window = self.window;
            map.retain(|_, (_, since)| since.elapsed() < window);
            if map.len() >= Self::MAX_TRACKED {
                // Every slot is a recent failure: refuse rather than forget.
                return true;
            }
        }
        let entry = map.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= self.window {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
        entry.0 >= self.max
    }

    /// A successful login clears the address's failures.
    pub fn succeeded(&self, ip: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_created_hash_checks_the_right_password_only_and_remembers_it() {
        let line = format!(
            "scanner:{}\n# comment\n",
            PasswordHash::create("s3cret pass").unwrap()
        );
        let users = std::sync::Arc::new(Users::parse(&line).unwrap());
        assert!(users.check("scanner", "s3cret pass").await);
        assert!(users.remembered.lock().unwrap().contains_key("scanner"));
        assert!(users.check("scanner", "s3cret pass").await, "remembered");
        assert!(!users.check("scanner", "s3cret pasS").await);
        assert!(!users.check("printer", "s3cret pass").await);
        assert!(!format!("{users:?}").contains("pbkdf2"));
    }

    #[test]
    fn bad_lines_are_named() {
        let e = Users::parse("a:$pbkdf2-sha256$1$AAAAAAAAAAA$AAAA").unwrap_err();
        assert!(e.0.starts_with("line 1:") && e.0.contains("too few"), "{e}");
        let e = Users::parse("\nnocolon").unwrap_err();
        assert!(e.0.starts_with("line 2:"), "{e}");
        let e = Users::parse("a:plaintext").unwrap_err();
        assert!(e.0.contains("sendbox hash-password"), "{e}");
    }

    #[test]
    fn failures_lock_an_address_for_the_window_and_success_clears_them() {
        let l = LoginLimiter::new(3, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(!l.failed(ip) && !l.failed(ip));
        assert!(!l.locked(ip));
        assert!(l.failed(ip));
        assert!(l.locked(ip));
        assert!(!l.locked("192.0.2.8".parse().unwrap()));
        l.succeeded(ip);
        assert!(!l.locked(ip));
    }
}
