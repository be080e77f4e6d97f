//! API keys: each has a name, a role (admin, writer, reader) and optional
//! stream-name prefixes it is limited to. Keys live in a JSON file (by default
//! `keys.json` in the data directory) with only a hash of the secret; the
//! secret is shown once, when the key is made. A key is sent as
//! `Authorization: Bearer cairn_<name>_<secret>`.
//!
//! Secrets are 256 random bits, so a salted SHA-256 is as safe as a slow
//! hash and costs microseconds. Older key files hold argon2 hashes, which
//! still verify, on a small blocking pool so they cannot stall the server.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordVerifier};
use cairn_core::{AppendCondition, QueryItem};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Read and write (within its prefixes).
    Writer,
    /// Read only (within its prefixes).
    Reader,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "writer" => Ok(Role::Writer),
            "reader" => Ok(Role::Reader),
            other => Err(format!("'{other}' is not a role; use admin, writer or reader")),
        }
    }
}

/// One key as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Key {
    pub name: String,
    pub role: Role,
    /// Stream-name prefixes this key may touch; empty for every stream.
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// `sha256$<salt hex>$<hex of SHA-256(salt ‖ secret)>`, or (older key
    /// files) an argon2id hash in PHC form.
    pub hash: String,
}

/// Who is asking.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    pub prefixes: Vec<String>,
}

impl Principal {
    /// The principal when authentication is off (loopback, no keys).
    pub fn anonymous_admin() -> Self {
        Principal { name: "anonymous".into(), role: Role::Admin, prefixes: Vec::new() }
    }

    /// Why this principal may not touch `stream` (to write it, if `write`).
    pub fn denies_stream(&self, stream: &str, write: bool) -> Option<String> {
        if write && self.role == Role::Reader {
            return Some(format!(
                "key '{}' is a reader; writing needs a writer or admin key",
                self.name
            ));
        }
        if !self.prefixes.is_empty()
            && !self.prefixes.iter().any(|p| stream.starts_with(p.as_str()))
        {
            return Some(format!(
                "key '{}' may only touch streams starting with {}",
                self.name,
                self.prefixes.join(", ")
            ));
        }
        None
    }

    /// Why this principal may not read across streams (`$all`, queries, lists).
    pub fn denies_all(&self) -> Option<String> {
        (!self.prefixes.is_empty()).then(|| {
            format!("key '{}' is limited to streams starting with {}, so it cannot read across all streams", self.name, self.prefixes.join(", "))
        })
    }

    /// Why this principal may not append with `condition`: its answer (409
    /// and `first_conflict`) would tell what streams beyond its prefixes hold.
    pub fn denies_condition(&self, condition: &AppendCondition) -> Option<String> {
        if self.prefixes.is_empty() {
            return None;
        }
        let items = &condition.fail_if_events_match.items;
        let outside = items.iter().position(|item| !self.confines(item))?;
        Some(format!(
            "key '{}' is limited to streams starting with {}, so every item of an append condition must name categories \
             whose streams all start with one of them; item {} does not (category `c` is the streams named `c-…`)",
            self.name,
            self.prefixes.join(", "),
            outside + 1
        ))
    }

    /// Whether every stream `item` can match starts with one of the
    /// prefixes. Category `c` is the streams named `c-…` (`c` has no `-`),
    /// which all start with `p` only if `c-` does: `orders-` confines
    /// category `orders`, `orders-eu-` does not. No categories: any stream.
    fn confines(&self, item: &QueryItem) -> bool {
        !item.categories.is_empty()
            && item.categories.iter().all(|c| {
                let streams = format!("{c}-");
                self.prefixes.iter().any(|p| streams.starts_with(p.as_str()))
            })
    }

    pub fn denies_admin(&self) -> Option<String> {
        (self.role != Role::Admin).then(|| format!("key '{}' is not an admin key", self.name))
    }
}

/// The key file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KeyFile {
    pub keys: Vec<Key>,
}

impl KeyFile {
    pub fn default_path(data: &Path) -> PathBuf {
        data.join("keys.json")
    }

    /// The keys in `path`; none if the file does not exist.
    pub fn load(path: &Path) -> Result<KeyFile, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is not a key file: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyFile::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Writes the file whole (readable by its owner only), then renames it over the old one.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).expect("keys serialise");
        let write = || -> std::io::Result<()> {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            std::io::Write::write_all(&mut options.open(&tmp)?, &text)?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Adds a key and returns its token (shown once; only its hash is kept).
    pub fn add(&mut self, name: &str, role: Role, prefixes: Vec<String>) -> Result<String, String> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("key name {name:?}: use letters, digits and '-'"));
        }
        if self.keys.iter().any(|k| k.name == name) {
            return Err(format!("there is already a key named '{name}'; remove it first"));
        }
        let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let salt = *uuid::Uuid::new_v4().as_bytes();
        let hash = format!("{SHA256_PREFIX}{}${}", hex(&salt), hex(&salted(&salt, &secret)));
        self.keys.push(Key { name: name.to_string(), role, prefixes, hash });
        Ok(format!("cairn_{name}_{secret}"))
    }

    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.keys.len();
        self.keys.retain(|k| k.name != name);
        self.keys.len() != before
    }
}

const SHA256_PREFIX: &str = "sha256$";

fn salted(salt: &[u8], secret: &str) -> [u8; 32] {
    Sha256::new().chain_update(salt).chain_update(secret.as_bytes()).finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// Whether `secret` matches `hash`; `None` if the hash is damaged.
fn matches(hash: &str, secret: &str) -> Option<bool> {
    let Some(rest) = hash.strip_prefix(SHA256_PREFIX) else {
        let hash = PasswordHash::new(hash).ok()?;
        return Some(Argon2::default().verify_password(secret.as_bytes(), &hash).is_ok());
    };
    let (salt, digest) = rest.split_once('$')?;
    let (salt, digest) = (unhex(salt)?, unhex(digest)?);
    Some(salted(&salt, secret)[..].ct_eq(&digest[..]).into())
}

/// A hash that is slow on purpose (argon2) and must not run on the async workers.
fn is_slow(hash: &str) -> bool {
    !hash.starts_with(SHA256_PREFIX)
}

/// Most failed logins from one address per window before it is refused.
const FAILURES_MAX: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered before the expired ones are forgotten.
const FAILURES_KEPT: usize = 10_000;
/// argon2 checks at once (each takes a core for milliseconds); more are
/// refused as busy rather than queued.
const SLOW_CHECKS: usize = 2;

/// Checks tokens against the key file. A token that verified once is
/// remembered (by its SHA-256), so argon2 runs once per key, not per
/// request, and a known-good key is never held up by the login limiter.
pub struct Auth {
    keys: Vec<Key>,
    verified: Mutex<HashMap<[u8; 32], usize>>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    slow: Arc<Semaphore>,
    /// What an unknown name is checked against, so that it costs what a
    /// known one does: an argon2 hash if the file has one, as those are slowest.
    dummy: String,
}

/// Why a request was not let in.
pub enum Refusal {
    Unauthorized(String),
    TooManyFailures,
    /// Too many argon2 checks under way; retry in a moment.
    Busy,
}

impl Auth {
    pub fn new(keys: KeyFile) -> Auth {
        let dummy = keys
            .keys
            .iter()
            .find(|k| is_slow(&k.hash))
            .or(keys.keys.first())
            .map(|k| k.hash.clone())
            .unwrap_or_default();
        Auth {
            keys: keys.keys,
            verified: Mutex::default(),
            failures: Mutex::default(),
            slow: Arc::new(Semaphore::new(SLOW_CHECKS)),
            dummy,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The principal behind an `Authorization` header value from `from`.
    /// Only a token shaped like a key is a login attempt: it is counted
    /// before it is checked (so a burst cannot outrun the limit) and
    /// uncounted if it verifies. While `from` is over the limit, tokens not
    /// verified before are refused unchecked: checking them would give
    /// guesses past the limit.
    pub async fn check(&self, header: Option<&str>, from: IpAddr) -> Result<Principal, Refusal> {
        let header = header.ok_or_else(|| {
            Refusal::Unauthorized(
                "this server needs an API key: send `Authorization: Bearer <key>`".into(),
            )
        })?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| {
                Refusal::Unauthorized("the Authorization header must be `Bearer <key>`".into())
            })?
            .trim();
        let seen: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(&i) = self.verified.lock().unwrap().get(&seen) {
            return Ok(self.principal(i));
        }
        let not_a_key = || {
            Refusal::Unauthorized(
                "not a Cairn API key (they look like cairn_<name>_<secret>)".into(),
            )
        };
        let rest = token.strip_prefix("cairn_").ok_or_else(not_a_key)?;
        let (name, secret) = rest.rsplit_once('_').ok_or_else(not_a_key)?;
        self.count_failure(from)?;
        match self.verify(name, secret).await {
            Ok(i) => {
                self.uncount_failure(from);
                self.verified.lock().unwrap().insert(seen, i);
                Ok(self.principal(i))
            }
            Err(Refusal::Busy) => {
                self.uncount_failure(from);
                Err(Refusal::Busy)
            }
            Err(refusal) => Err(refusal),
        }
    }

    fn principal(&self, i: usize) -> Principal {
        let k = &self.keys[i];
        Principal { name: k.name.clone(), role: k.role, prefixes: k.prefixes.clone() }
    }

    fn count_failure(&self, from: IpAddr) -> Result<(), Refusal> {
        let mut failures = self.failures.lock().unwrap();
        if failures.len() >= FAILURES_KEPT {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(from).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        if entry.0 >= FAILURES_MAX {
            return Err(Refusal::TooManyFailures);
        }
        entry.0 += 1;
        Ok(())
    }

    fn uncount_failure(&self, from: IpAddr) {
        if let Some(entry) = self.failures.lock().unwrap().get_mut(&from) {
            entry.0 = entry.0.saturating_sub(1);
        }
    }

    /// The index of the key `name` if `secret` is its secret.
    async fn verify(&self, name: &str, secret: &str) -> Result<usize, Refusal> {
        let found = self.keys.iter().position(|k| k.name == name);
        // An unknown name is checked against a real hash and the answer thrown away.
        let hash = found.map_or(&self.dummy, |i| &self.keys[i].hash);
        let matched = if is_slow(hash) {
            let permit = self.slow.clone().try_acquire_owned().map_err(|_| Refusal::Busy)?;
            let (hash, secret) = (hash.clone(), secret.to_string());
            // The permit goes with the work, so it is held until argon2 ends even if the request is dropped.
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                matches(&hash, &secret)
            })
            .await
            .unwrap_or(None)
        } else {
            matches(hash, secret)
        };
        match (found, matched) {
            (Some(i), Some(true)) => Ok(i),
            (Some(_), None) => Err(Refusal::Unauthorized(format!(
                "the key file holds a damaged hash for key '{name}'; remove the key and add it again with `cairn keys`"
            ))),
            _ => Err(Refusal::Unauthorized("unknown or wrong API key".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::Query;

    fn limited(prefixes: &[&str]) -> Principal {
        Principal {
            name: "k".into(),
            role: Role::Writer,
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn condition(items: Vec<QueryItem>) -> AppendCondition {
        AppendCondition::fail_if_events_match(Query::new(items))
    }

    #[test]
    fn a_condition_is_confined_when_each_item_names_categories_within_the_prefixes() {
        let orders = || QueryItem::categories(["orders"]);
        let allowed = [
            (&["orders-"][..], vec![orders()]),
            (&["ord"], vec![orders().with_types(["Placed"])]),
            (&["orders"], vec![orders()]),
            (
                &["account-", "orders-"],
                vec![orders(), QueryItem::categories(["account", "orders"])],
            ),
        ];
        for (prefixes, items) in allowed {
            assert_eq!(
                limited(prefixes).denies_condition(&condition(items.clone())),
                None,
                "{prefixes:?} {items:?}"
            );
        }
        let refused = [
            // orders-us-1 is in category orders but not under the prefix.
            (&["orders-eu-"][..], vec![orders()]),
            (&["orders-"], vec![QueryItem::categories(["orders", "account"])]),
            (&["orders-"], vec![orders(), QueryItem::types(["MoneyDeposited"])]),
            (&["orders-"], vec![QueryItem::tags(["order:1"])]),
            (&["orders-"], vec![QueryItem::categories(["ordersx"])]),
        ];
        for (prefixes, items) in refused {
            let reason =
                limited(prefixes).denies_condition(&condition(items.clone())).expect("refused");
            assert!(reason.contains("append condition"), "{reason}");
        }
        assert_eq!(limited(&[]).denies_condition(&condition(vec![QueryItem::any()])), None);
    }

    #[test]
    fn new_keys_are_salted_sha256_and_compare_as_such() {
        let mut file = KeyFile::default();
        let token = file.add("ci", Role::Reader, vec![]).unwrap();
        let secret = token.rsplit('_').next().unwrap();
        let hash = &file.keys[0].hash;
        assert!(hash.starts_with("sha256$") && !hash.contains(secret), "{hash}");
        assert_eq!(matches(hash, secret), Some(true));
        assert_eq!(matches(hash, &format!("{secret}x")), Some(false));
        assert_eq!(matches("sha256$zz$00", secret), None);
        let again = file.add("ci2", Role::Reader, vec![]).unwrap();
        assert_ne!(
            file.keys[0].hash.split('$').nth(1),
            file.keys[1].hash.split('$').nth(1),
            "each key has its own salt"
        );
        assert_ne!(token, again);
    }

    #[tokio::test]
    async fn only_tokens_shaped_like_keys_count_as_failed_logins() {
        let mut file = KeyFile::default();
        let token = file.add("ops", Role::Admin, vec![]).unwrap();
        let auth = Auth::new(file);
        let from = IpAddr::from([192, 0, 2, 1]);
        for header in [None, Some("Basic b3BzOg=="), Some("Bearer not-a-key")] {
            for _ in 0..FAILURES_MAX + 1 {
                assert!(matches!(auth.check(header, from).await, Err(Refusal::Unauthorized(_))));
            }
        }
        let bearer = format!("Bearer {token}");
        // A success gives its count back, so ten of them still leave ten guesses.
        for _ in 0..FAILURES_MAX {
            auth.verified.lock().unwrap().clear();
            assert!(auth.check(Some(&bearer), from).await.is_ok());
        }
        for _ in 0..FAILURES_MAX {
            assert!(matches!(
                auth.check(Some("Bearer cairn_ops_wrong"), from).await,
                Err(Refusal::Unauthorized(_))
            ));
        }
        assert!(matches!(
            auth.check(Some("Bearer cairn_nobody_wrong"), from).await,
            Err(Refusal::TooManyFailures)
        ));
        assert!(
            auth.check(Some(&bearer), from).await.is_ok(),
            "a key verified before still gets in"
        );
    }
}
