//! Engine benchmarks against `FakeBackend`; prints figures, asserts nothing.
//!
//! `cargo bench -p sana-engine --bench engine`
//!
//! 1. Overhead: a zero-cost backend, 1000 requests in flight at once; wall time per request is
//!    the engine's own cost (admission, queue, batching, worker hand-off, fan-out, stream).
//! 2. Batching: a backend whose cost is a fixed part per batch plus a part per image; throughput
//!    with batches of up to 16 images against one image at a time, measured in the same run.

use std::time::{Duration, Instant};

use sana_engine::testing::{FakeBackend, Latency};
use sana_engine::{Engine, EngineConfig, GenerateRequest};

fn config(max_batch_images: usize, max_concurrent_requests: usize) -> EngineConfig {
    EngineConfig {
        devices: vec!["fake:0".to_owned()],
        max_concurrent_requests,
        max_batch_images,
        max_n: 1,
        warmup_steps: 0,
        ..EngineConfig::default()
    }
}

fn request(i: usize, sizes: &[(u32, u32)]) -> GenerateRequest {
    let (width, height) = sizes[i % sizes.len()];
    GenerateRequest {
        width: Some(width),
        height: Some(height),
        steps: Some(1),
        seed: Some(i as u64),
        ..GenerateRequest::new(format!("bench {i}"))
    }
}

/// Submits `count` requests at once and waits for every answer; returns the wall time.
async fn round(engine: &Engine, count: usize, sizes: &[(u32, u32)]) -> Duration {
    let started = Instant::now();
    let streams: Vec<_> = (0..count)
        .map(|i| engine.submit(request(i, sizes)).expect("admitted"))
        .collect();
    for stream in streams {
        stream.result().await.expect("generated");
    }
    started.elapsed()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn overhead(max_batch_images: usize) {
    const IN_FLIGHT: usize = 1000;
    let fake = FakeBackend::new();
    let log = fake.log();
    let engine = Engine::start(config(max_batch_images, IN_FLIGHT), fake.factory())
        .await
        .expect("starts");
    for _ in 0..5 {
        round(&engine, IN_FLIGHT, &[(32, 32)]).await;
    }
    let before = log.batches().len();
    let samples = rounds(&engine, 30, IN_FLIGHT).await;
    let batches = log.batches().len() - before;
    let best = *samples.iter().min().expect("rounds ran");
    let median = median(samples);
    println!(
        "overhead: zero-cost backend, {IN_FLIGHT} requests in flight, 1 worker, batches ≤ {max_batch_images}"
    );
    println!(
        "  per request: median {:.2} µs, best {:.2} µs (target < 50 µs); {:.1} images per batch",
        median.as_secs_f64() * 1e6 / IN_FLIGHT as f64,
        best.as_secs_f64() * 1e6 / IN_FLIGHT as f64,
        (30 * IN_FLIGHT) as f64 / batches as f64,
    );
    engine.shutdown(Duration::from_secs(10)).await;
}

async fn rounds(engine: &Engine, rounds: usize, count: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        samples.push(round(engine, count, &[(32, 32)]).await);
    }
    samples
}

async fn throughput(max_batch_images: usize, requests: usize, sizes: &[(u32, u32)]) -> f64 {
    let fake = FakeBackend::new().with_latency(Latency {
        per_batch: Duration::from_millis(20),
        per_image: Duration::from_millis(2),
        per_step: Duration::ZERO,
    });
    let engine = Engine::start(config(max_batch_images, requests), fake.factory())
        .await
        .expect("starts");
    let elapsed = round(&engine, requests, sizes).await;
    engine.shutdown(Duration::from_secs(10)).await;
    requests as f64 / elapsed.as_secs_f64()
}

async fn batching() {
    const REQUESTS: usize = 128;
    let one_size = [(64, 64)];
    let three_sizes = [(64, 64), (128, 64), (64, 128)];
    let single = throughput(1, REQUESTS, &one_size).await;
    let batched = throughput(16, REQUESTS, &one_size).await;
    let mixed = throughput(16, REQUESTS, &three_sizes).await;
    println!(
        "batching: backend cost 20 ms per batch + 2 ms per image, {REQUESTS} requests in flight, 1 worker"
    );
    println!("  max batch 1:                 {single:8.1} images/s");
    println!(
        "  max batch 16:                {batched:8.1} images/s  ({:.2}x; ideal (20+2)/(20/16+2) = 6.77x)",
        batched / single
    );
    println!(
        "  max batch 16, 3 sizes mixed: {mixed:8.1} images/s  ({:.2}x)",
        mixed / single
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        overhead(16).await;
        overhead(1).await;
        batching().await;
    });
}
