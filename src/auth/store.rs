//! The virtual key store: a `keys` table in its own SQLite file, shared by the CLI
//! (`tiergate keys …`) and the running gateway. It holds key hashes, never key secrets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::KeyLimits;
use crate::report::now_ms;

/// Every gateway key starts with this, so a leaked one is recognisable (and never confused
/// with a provider key).
pub const KEY_PREFIX: &str = "tg-";

/// A virtual key as stored: everything but the secret.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    /// Stable, non-secret id (`key_` + 12 hex digits); what the ledger records.
    pub id: String,
    pub name: String,
    pub team: Option<String>,
    /// The secret's first characters (`tg-1a2b3c4d`), to tell keys apart in listings.
    pub prefix: String,
    pub limits: KeyLimits,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// What `tiergate keys create` asks for.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub team: Option<String>,
    pub limits: KeyLimits,
}

impl NewKey {
    /// A key with only a name: no team, the `[auth]` default limits.
    pub fn named(name: &str) -> NewKey {
        NewKey {
            name: name.to_owned(),
            ..NewKey::default()
        }
    }
}

pub struct KeyStore {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    team TEXT,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    rpm INTEGER,
    tpm INTEGER,
    daily_usd REAL,
    monthly_usd REAL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);";

const COLUMNS: &str = "id, name, team, prefix, rpm, tpm, daily_usd, monthly_usd, created_ms, revoked_ms";

/// SHA-256 of the whole secret, hex. A plain fast hash is enough here, unlike for
/// passwords: the secrets are 256 random bits, so there is no dictionary to try and a
/// brute force of the hash is as hopeless as guessing the key; a slow KDF would only add
/// latency to every request whose key is not cached.
pub fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn random_hex(n: usize) -> Result<String, String> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| format!("no randomness from the operating system: {e}"))?;
    Ok(hex(&buf))
}

/// Names and teams are printed by `keys list`, written to logs and matched by policies:
/// control characters (a terminal escape, a newline), invisible ones that make two names
/// look alike (zero-width, bidi overrides), surrounding spaces and very long values are
/// refused.
fn check_label(flag: &str, value: &str) -> Result<(), String> {
    const MAX_CHARS: usize = 128;
    let invisible =
        |c: char| matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}');
    if value.chars().any(|c| c.is_control() || invisible(c)) {
        return Err(format!(
            "the key's `{flag}` must not contain control or invisible characters (escapes, tabs, newlines, zero-width or bidi marks)"
        ));
    }
    if value.trim().is_empty() {
        return Err(format!("the key's `{flag}` must not be empty"));
    }
    if value.trim() != value {
        return Err(format!("the key's `{flag}` must not start or end with spaces"));
    }
    if value.chars().count() > MAX_CHARS {
        return Err(format!("the key's `{flag}` must be at most {MAX_CHARS} characters"));
    }
    Ok(())
}

impl KeyStore {
    /// Opens (creating if needed) the key store at `path`.
    pub fn open(path: &Path) -> Result<KeyStore, String> {
        let fail = |e: rusqlite::Error| format!("key store `{}`: {e}", path.display());
        let conn = Connection::open(path).map_err(fail)?;
        // WAL: the gateway reads while `tiergate keys` writes; the busy timeout covers the
        // moment a writer holds the lock.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(fail)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(fail)?;
        conn.execute_batch(SCHEMA).map_err(fail)?;
        Ok(KeyStore {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, e: rusqlite::Error) -> String {
        format!("key store `{}`: {e}", self.path.display())
    }

    /// Creates a key and returns it with its secret, which is not stored and cannot be
    /// shown again.
    pub fn create(&self, new: &NewKey) -> Result<(ApiKey, String), String> {
        let NewKey { name, team, limits } = new;
        check_label("--name", name)?;
        if let Some(t) = team {
            check_label("--team", t)?;
        }
        if self.find(name)?.is_some() {
            return Err(format!(
                "a key named `{name}` already exists; pick another name (names stay taken after revocation, so the ledger's history stays unambiguous)"
            ));
        }
        let secret = format!("{KEY_PREFIX}{}", random_hex(32)?);
        let key = ApiKey {
            id: format!("key_{}", random_hex(6)?),
            name: name.clone(),
            team: team.clone(),
            prefix: secret[..KEY_PREFIX.len() + 8].to_owned(),
            limits: *limits,
            created_ms: now_ms(),
            revoked_ms: None,
        };
        self.conn
            .execute(
                "INSERT INTO keys (id, name, team, key_hash, prefix, rpm, tpm, daily_usd, monthly_usd, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    key.id,
                    key.name,
                    key.team,
                    hash_secret(&secret),
                    key.prefix,
                    limits.rpm,
                    limits.tpm,
                    limits.daily_usd,
                    limits.monthly_usd,
                    key.created_ms
                ],
            )
            .map_err(|e| self.fail(e))?;
        Ok((key, secret))
    }

    pub fn list(&self) -> Result<Vec<ApiKey>, String> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {COLUMNS} FROM keys ORDER BY created_ms, name"))
            .map_err(|e| self.fail(e))?;
        let rows = stmt.query_map([], row_to_key).map_err(|e| self.fail(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.fail(e))
    }

    /// The key whose name or id is `name_or_id`.
    pub fn find(&self, name_or_id: &str) -> Result<Option<ApiKey>, String> {
        self.conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM keys WHERE name = ?1 OR id = ?1"),
                [name_or_id],
                row_to_key,
            )
            .optional()
            .map_err(|e| self.fail(e))
    }

    /// The key with this secret's hash, revoked or not.
    pub fn by_hash(&self, key_hash: &str) -> Result<Option<ApiKey>, String> {
        self.conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM keys WHERE key_hash = ?1"),
                [key_hash],
                row_to_key,
            )
            .optional()
            .map_err(|e| self.fail(e))
    }

    /// Revokes a key by name or id; returns it, or `None` if there is no such key.
    pub fn revoke(&self, name_or_id: &str) -> Result<Option<ApiKey>, String> {
        let Some(key) = self.find(name_or_id)? else {
            return Ok(None);
        };
        if key.revoked_ms.is_none() {
            self.conn
                .execute(
                    "UPDATE keys SET revoked_ms = ?1 WHERE id = ?2",
                    params![now_ms(), key.id],
                )
                .map_err(|e| self.fail(e))?;
        }
        self.find(&key.id)
    }
}

fn row_to_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        id: r.get(0)?,
        name: r.get(1)?,
        team: r.get(2)?,
        prefix: r.get(3)?,
        limits: KeyLimits {
            rpm: r.get(4)?,
            tpm: r.get(5)?,
            daily_usd: r.get(6)?,
            monthly_usd: r.get(7)?,
        },
        created_ms: r.get(8)?,
        revoked_ms: r.get(9)?,
    })
}
