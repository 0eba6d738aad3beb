//! Where provisioned artifacts live: `$TIERGATE_CACHE`, else `$XDG_CACHE_HOME/tiergate`,
//! else `~/.cache/tiergate` — the same rule `scripts/provision.py` follows.

use std::path::PathBuf;

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TIERGATE_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("tiergate");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("tiergate")
}
