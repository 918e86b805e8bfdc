//! Randomness from the operating system's CSPRNG, for ids and secrets.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::{Error, Result};

/// `len` random bytes from the OS CSPRNG.
pub fn bytes(len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    getrandom::fill(&mut buf).map_err(|e| Error::Unavailable {
        message: format!("the OS random number generator failed: {e}"),
        source: None,
    })?;
    Ok(buf)
}

/// A URL-safe (base64url, unpadded) random string of `len` bytes of entropy.
///
/// The OS CSPRNG does not fail on supported platforms; should it ever, this falls back to
/// nothing weaker but panics are not allowed in library code, so it returns a time-and-counter
/// string only for non-secret uses (test namespaces). Secrets use [`secret_token`].
pub fn token(len: usize) -> String {
    match bytes(len) {
        Ok(b) => URL_SAFE_NO_PAD.encode(b),
        Err(_) => {
            use std::sync::atomic::{AtomicU64, Ordering};
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            format!(
                "{:x}{:x}",
                crate::codec::now_millis(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            )
        }
    }
}

/// A URL-safe random secret of `len` bytes of entropy; an error if the CSPRNG fails.
pub fn secret_token(len: usize) -> Result<String> {
    Ok(URL_SAFE_NO_PAD.encode(bytes(len)?))
}
