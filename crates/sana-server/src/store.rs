//! Images of `response_format: "url"` generations: kept in memory for a time-to-live under a byte
//! budget (oldest evicted first), each under an unguessable name (122 random bits, UUID v4).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;

/// Where "now" comes from, so that tests can move time forward without sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told; for tests of expiry and rate limits.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    offset_ms: AtomicU64,
}

impl ManualClock {
    /// A clock at the current instant.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            offset_ms: AtomicU64::new(0),
        })
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + Duration::from_millis(self.offset_ms.load(Ordering::SeqCst))
    }
}

/// A stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    /// The encoded image.
    pub bytes: Bytes,
    /// Its MIME type.
    pub content_type: &'static str,
}

/// Why an image was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "an image of {size} bytes does not fit the url store of {capacity} bytes (--url-store-bytes)"
)]
pub struct TooLarge {
    /// The image's size.
    pub size: usize,
    /// The store's capacity.
    pub capacity: usize,
}

/// A bounded, expiring, in-memory image store; a cheap `Clone` handle.
#[derive(Debug, Clone)]
pub struct ImageStore {
    inner: Arc<Mutex<Inner>>,
    ttl: Duration,
    capacity: usize,
    clock: Arc<dyn Clock>,
}

#[derive(Debug, Default)]
struct Inner {
    images: HashMap<String, (StoredImage, Instant)>,
    /// Names in insertion order, which is also expiry order (one TTL for all).
    order: VecDeque<String>,
    bytes: usize,
}

impl Inner {
    fn remove_oldest(&mut self) {
        if let Some(name) = self.order.pop_front() {
            if let Some((image, _)) = self.images.remove(&name) {
                self.bytes -= image.bytes.len();
            }
        }
    }

    fn purge_expired(&mut self, now: Instant) {
        while let Some(name) = self.order.front() {
            match self.images.get(name) {
                Some((_, expires)) if *expires > now => break,
                _ => self.remove_oldest(),
            }
        }
    }
}

impl ImageStore {
    /// A store keeping images for `ttl` within `capacity` bytes.
    pub fn new(ttl: Duration, capacity: usize, clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Arc::default(),
            ttl,
            capacity,
            clock,
        }
    }

    /// Stores an image and returns its name, `<32 hex digits>.<extension>`.
    pub fn insert(
        &self,
        bytes: Bytes,
        content_type: &'static str,
        extension: &str,
    ) -> Result<String, TooLarge> {
        if bytes.len() > self.capacity {
            return Err(TooLarge {
                size: bytes.len(),
                capacity: self.capacity,
            });
        }
        let now = self.clock.now();
        let name = format!("{}.{extension}", uuid::Uuid::new_v4().simple());
        let mut inner = self.lock();
        inner.purge_expired(now);
        while inner.bytes + bytes.len() > self.capacity {
            inner.remove_oldest();
        }
        inner.bytes += bytes.len();
        inner.order.push_back(name.clone());
        let expires = now
            .checked_add(self.ttl)
            .unwrap_or(now + Duration::from_secs(86_400 * 365));
        inner.images.insert(
            name.clone(),
            (
                StoredImage {
                    bytes,
                    content_type,
                },
                expires,
            ),
        );
        Ok(name)
    }

    /// The image stored under `name`, unless it expired or was evicted.
    pub fn get(&self, name: &str) -> Option<StoredImage> {
        let now = self.clock.now();
        let mut inner = self.lock();
        inner.purge_expired(now);
        inner.images.get(name).map(|(image, _)| image.clone())
    }

    /// Images held now (expired ones not yet purged included).
    pub fn len(&self) -> usize {
        self.lock().images.len()
    }

    /// Whether no image is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How long images are kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(ttl_secs: u64, capacity: usize) -> (ImageStore, Arc<ManualClock>) {
        let clock = ManualClock::new();
        (
            ImageStore::new(Duration::from_secs(ttl_secs), capacity, clock.clone()),
            clock,
        )
    }

    fn put(store: &ImageStore, bytes: &[u8]) -> String {
        store
            .insert(Bytes::copy_from_slice(bytes), "image/png", "png")
            .expect("fits")
    }

    #[test]
    fn images_expire_after_the_ttl() {
        let (store, clock) = store(60, 1024);
        let name = put(&store, b"abc");
        assert_eq!(store.get(&name).expect("fresh").bytes.as_ref(), b"abc");
        clock.advance(Duration::from_secs(59));
        assert!(store.get(&name).is_some(), "still valid before the TTL");
        clock.advance(Duration::from_secs(1));
        assert!(store.get(&name).is_none(), "gone at the TTL");
        assert!(store.is_empty(), "expired images are dropped");
    }

    #[test]
    fn names_are_unguessable_and_distinct() {
        let (store, _) = store(60, 1 << 20);
        let a = put(&store, b"a");
        let b = put(&store, b"a");
        assert_ne!(a, b);
        let (stem, ext) = a.split_once('.').expect("a name with an extension");
        assert_eq!(ext, "png");
        assert_eq!(stem.len(), 32, "128-bit UUID in hex: {a}");
        assert!(stem.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(store.get("00000000000000000000000000000000.png").is_none());
    }

    #[test]
    fn the_oldest_images_make_room_for_new_ones() {
        let (store, _) = store(60, 10);
        let first = put(&store, &[0; 4]);
        let second = put(&store, &[1; 4]);
        let third = put(&store, &[2; 4]);
        assert!(
            store.get(&first).is_none(),
            "evicted to stay within 10 bytes"
        );
        assert!(store.get(&second).is_some());
        assert!(store.get(&third).is_some());
        assert_eq!(
            store.insert(Bytes::from_static(&[0; 11]), "image/png", "png"),
            Err(TooLarge {
                size: 11,
                capacity: 10
            })
        );
    }
}
