//! Cache.

use crate::pool::Redis;

/// Response cache.
#[derive(Debug, Clone)]
pub struct CacheManager {
    redis: Redis,
}

impl Redis {
    /// The cache repository.
    pub fn cache(&self) -> CacheManager {
        CacheManager {
            redis: self.clone(),
        }
    }
}
