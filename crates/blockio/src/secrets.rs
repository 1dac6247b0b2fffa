//! Secrets (passphrases) handed to drivers by id, as qemu's `--object secret,id=ID,…`.
//!
//! An image names the secret it needs through an option (qcow2: `encrypt.key-secret=ID`);
//! the caller supplies the bytes for that id in a [`Secrets`] set carried by
//! [`crate::OpenOptions::secrets`] and [`crate::CreateRequest::secrets`]. The bytes are
//! zeroed when the last copy of the set is dropped and never printed: `Debug` shows the
//! ids only, and drivers never put secret material into errors.

use std::collections::BTreeMap;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// A set of named secrets. Cloning is cheap (shared).
#[derive(Clone, Default)]
pub struct Secrets {
    map: Arc<BTreeMap<String, Zeroizing<Vec<u8>>>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("ids", &self.map.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Secrets {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the secret `id` with `data` (the passphrase bytes).
    pub fn insert(&mut self, id: impl Into<String>, data: impl Into<Vec<u8>>) {
        Arc::make_mut(&mut self.map).insert(id.into(), Zeroizing::new(data.into()));
    }

    /// Builder form of [`Secrets::insert`].
    pub fn with(mut self, id: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        self.insert(id, data);
        self
    }

    /// The bytes of secret `id`.
    pub fn get(&self, id: &str) -> Option<&[u8]> {
        self.map.get(id).map(|v| v.as_slice())
    }

    /// The bytes of secret `id`, or qemu's error naming the (missing) id.
    pub fn require(&self, id: &str) -> Result<&[u8]> {
        self.get(id)
            .ok_or_else(|| Error::Key(format!("No secret with id '{id}'").into()))
    }

    /// True when no secret is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_debug_hides_data() {
        let s = Secrets::new().with("sec0", "hunter2");
        assert_eq!(s.get("sec0"), Some(&b"hunter2"[..]));
        assert!(s.require("nope").unwrap_err().to_string().contains("nope"));
        let d = format!("{s:?}");
        assert!(d.contains("sec0") && !d.contains("hunter2"), "{d}");
    }
}
