//! API keys: each has a name, a role (admin, writer, reader) and optional
//! stream-name prefixes it is limited to. Keys live in a JSON file (by default
//! `keys.json` in the data directory) with only an argon2 hash of the secret;
//! the secret is shown once, when the key is made. A key is sent as
//! `Authorization: Bearer cairn_<name>_<secret>`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};

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
    /// argon2id hash of the secret, in PHC form.
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
            return Some(format!("key '{}' is a reader; writing needs a writer or admin key", self.name));
        }
        if !self.prefixes.is_empty() && !self.prefixes.iter().any(|p| stream.starts_with(p.as_str())) {
            return Some(format!("key '{}' may only touch streams starting with {}", self.name, self.prefixes.join(", ")));
        }
        None
    }

    /// Why this principal may not read across streams (`$all`, queries, lists).
    pub fn denies_all(&self) -> Option<String> {
        (!self.prefixes.is_empty()).then(|| {
            format!("key '{}' is limited to streams starting with {}, so it cannot read across all streams", self.name, self.prefixes.join(", "))
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
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{} is not a key file: {e}", path.display())),
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
        let salt = SaltString::encode_b64(uuid::Uuid::new_v4().as_bytes()).map_err(|e| e.to_string())?;
        let hash = Argon2::default().hash_password(secret.as_bytes(), &salt).map_err(|e| e.to_string())?.to_string();
        self.keys.push(Key { name: name.to_string(), role, prefixes, hash });
        Ok(format!("cairn_{name}_{secret}"))
    }

    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.keys.len();
        self.keys.retain(|k| k.name != name);
        self.keys.len() != before
    }
}

/// Most failed logins from one address per window before it is refused.
const FAILURES_MAX: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Checks tokens against the key file. A token that verified once is
/// remembered, so argon2 (slow on purpose) runs once per key, not per request.
pub struct Auth {
    keys: Vec<Key>,
    verified: Mutex<HashMap<String, usize>>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Why a request was not let in.
pub enum Refusal {
    Unauthorized(String),
    TooManyFailures,
}

impl Auth {
    pub fn new(keys: KeyFile) -> Auth {
        Auth { keys: keys.keys, verified: Mutex::default(), failures: Mutex::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The principal behind an `Authorization` header value from `from`.
    pub fn check(&self, header: Option<&str>, from: IpAddr) -> Result<Principal, Refusal> {
        if let Some((count, since)) = self.failures.lock().unwrap().get(&from) {
            if *count >= FAILURES_MAX && since.elapsed() < FAILURE_WINDOW {
                return Err(Refusal::TooManyFailures);
            }
        }
        let result = self.verify(header);
        if result.is_err() {
            let mut failures = self.failures.lock().unwrap();
            let entry = failures.entry(from).or_insert((0, Instant::now()));
            if entry.1.elapsed() >= FAILURE_WINDOW {
                *entry = (0, Instant::now());
            }
            entry.0 += 1;
        }
        result.map_err(Refusal::Unauthorized)
    }

    fn verify(&self, header: Option<&str>) -> Result<Principal, String> {
        let header = header.ok_or("this server needs an API key: send `Authorization: Bearer <key>`")?;
        let token = header.strip_prefix("Bearer ").ok_or("the Authorization header must be `Bearer <key>`")?.trim();
        let principal = |k: &Key| Principal { name: k.name.clone(), role: k.role, prefixes: k.prefixes.clone() };
        if let Some(&i) = self.verified.lock().unwrap().get(token) {
            return Ok(principal(&self.keys[i]));
        }
        let rest = token.strip_prefix("cairn_").ok_or("not a Cairn API key")?;
        let (name, secret) = rest.rsplit_once('_').ok_or("not a Cairn API key")?;
        let (i, key) = self.keys.iter().enumerate().find(|(_, k)| k.name == name).ok_or("unknown or wrong API key")?;
        let hash = PasswordHash::new(&key.hash).map_err(|_| "the key file holds a damaged hash for this key")?;
        Argon2::default().verify_password(secret.as_bytes(), &hash).map_err(|_| "unknown or wrong API key")?;
        self.verified.lock().unwrap().insert(token.to_string(), i);
        Ok(principal(key))
    }
}
