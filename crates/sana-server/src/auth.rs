//! API keys (checked in constant time on every route but `/health` and the capability URLs of
//! stored images) and the per-key rate limit of image generations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::KeyId;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::Clock;

/// Who is calling: the id of the API key that matched, or `None` when authentication is off.
/// Put in the request's extensions by [`require_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Caller(pub Option<KeyId>);

/// Middleware: answers 401 unless the request carries `Authorization: Bearer <key>` with a
/// configured key; lets everything through when no key is configured.
pub async fn require_key(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let keys = state.api_keys();
    if !keys.is_enabled() {
        req.extensions_mut().insert(Caller(None));
        return next.run(req).await;
    }
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return ApiError::unauthorized("missing API key; send it as `Authorization: Bearer <key>`")
            .into_response();
    };
    let token = value.to_str().ok().and_then(|value| {
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let Some(token) = token else {
        return ApiError::unauthorized(
            "malformed `Authorization` header; send `Authorization: Bearer <key>`",
        )
        .into_response();
    };
    match keys.identify(token) {
        Some(id) => {
            req.extensions_mut().insert(Caller(Some(id)));
            let response = next.run(req).await;
            // Per key, by its id (never the key): requests and their status.
            metrics::counter!(
                crate::metrics::KEY_REQUESTS,
                "key" => id.to_string(),
                "status" => response.status().as_str().to_owned()
            )
            .increment(1);
            response
        }
        None => ApiError::unauthorized("invalid API key").into_response(),
    }
}

/// Middleware: the per-key rate limit (429 with `Retry-After` past it). Runs after
/// [`require_key`].
pub async fn rate_limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(limiter) = state.rate_limiter() {
        let caller = req
            .extensions()
            .get::<Caller>()
            .copied()
            .unwrap_or(Caller(None));
        if let Err(retry_after) = limiter.check(caller) {
            return ApiError::rate_limited(limiter.per_minute(), retry_after).into_response();
        }
    }
    next.run(req).await
}

/// A token bucket per caller holding `per_minute` tokens, refilled at `per_minute` per minute.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    per_minute: u32,
    buckets: Arc<Mutex<HashMap<Caller, Bucket>>>,
    clock: Arc<dyn Clock>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// A limiter allowing `per_minute` requests per minute per caller, in bursts of up to
    /// `per_minute`.
    pub fn new(per_minute: u32, clock: Arc<dyn Clock>) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: Arc::default(),
            clock,
        }
    }

    /// The limit.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Takes a token for `caller`, or says in how many whole seconds one will be there.
    pub fn check(&self, caller: Caller) -> Result<(), u64> {
        let now = self.clock.now();
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets.entry(caller).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            // Less a nanosecond, so float error does not round a whole second up.
            let wait = ((1.0 - bucket.tokens) / per_second - 1e-9).ceil();
            // Bounded by 60 s: a token takes at most a minute to come back.
            Err((wait as u64).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManualClock;
    use std::time::Duration;

    #[test]
    fn a_burst_of_the_limit_passes_then_callers_wait_for_refill() {
        let clock = ManualClock::new();
        let limiter = RateLimiter::new(2, clock.clone());
        let keys = crate::config::ApiKeys::new(["sk-alice", "sk-bob"]);
        let alice = Caller(keys.identify("sk-alice"));
        let bob = Caller(keys.identify("sk-bob"));
        assert_ne!(alice, bob);
        assert_eq!(limiter.check(alice), Ok(()));
        assert_eq!(limiter.check(alice), Ok(()));
        assert_eq!(
            limiter.check(alice),
            Err(30),
            "2 per minute: one token per 30 s"
        );
        assert_eq!(limiter.check(bob), Ok(()), "keys have their own buckets");
        clock.advance(Duration::from_secs(20));
        assert_eq!(limiter.check(alice), Err(10), "10 s of the 30 s left");
        clock.advance(Duration::from_secs(10));
        assert_eq!(limiter.check(alice), Ok(()));
        assert_eq!(limiter.check(alice), Err(30));
        clock.advance(Duration::from_secs(3600));
        assert_eq!(limiter.check(alice), Ok(()));
        assert_eq!(limiter.check(alice), Ok(()));
        assert!(
            limiter.check(alice).is_err(),
            "refill stops at the burst size"
        );
    }
}
