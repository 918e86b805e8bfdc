//! Sessions.

use crate::pool::Redis;

/// User sessions.
#[derive(Debug, Clone)]
pub struct SessionStore {
    redis: Redis,
}

impl Redis {
    /// The session repository.
    pub fn sessions(&self) -> SessionStore {
        SessionStore {
            redis: self.clone(),
        }
    }
}
