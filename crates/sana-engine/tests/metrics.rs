//! The engine's metrics, read back from a debugging recorder. Its own test binary, because the
//! recorder is process-global and the worker threads record into it.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;
use sana_engine::testing::{FakeBackend, Gate};
use sana_engine::{metrics as names, Engine, EngineConfig, EngineError, GenerateRequest};

fn request(prompt: &str, width: u32) -> GenerateRequest {
    GenerateRequest {
        width: Some(width),
        height: Some(64),
        steps: Some(2),
        seed: Some(1),
        ..GenerateRequest::new(prompt)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_batches_and_failures_are_recorded_by_type() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this binary");

    let gate = Gate::closed();
    let engine = Engine::start(
        EngineConfig {
            devices: vec!["fake:0".into()],
            max_concurrent_requests: 2,
            warmup_steps: 0,
            ..EngineConfig::default()
        },
        FakeBackend::new().with_gate(gate.clone()).factory(),
    )
    .await
    .expect("starts");
    let served = engine.submit(request("served", 64)).expect("admitted");
    let abandoned = engine.submit(request("abandoned", 128)).expect("admitted");
    assert!(matches!(
        engine.submit(request("refused", 64)),
        Err(EngineError::Overloaded { .. })
    ));
    assert!(matches!(
        engine.submit(request("", 64)),
        Err(EngineError::Validation(_))
    ));
    drop(abandoned);
    gate.open();
    served.result().await.expect("generated");
    let report = engine.shutdown(Duration::from_secs(30)).await;
    assert!(report.drained);

    let mut counters = Vec::new();
    let mut histograms = Vec::new();
    let mut gauges = Vec::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name().to_owned();
        let labels: Vec<String> = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        match (key.kind(), value) {
            (MetricKind::Counter, DebugValue::Counter(v)) => counters.push((name, labels, v)),
            (MetricKind::Histogram, DebugValue::Histogram(v)) => histograms.push((name, v.len())),
            (MetricKind::Gauge, _) => gauges.push(name),
            _ => {}
        }
    }
    let counter = |name: &str, label: Option<&str>| {
        counters
            .iter()
            .filter(|(n, labels, _)| {
                n == name && label.is_none_or(|l| labels.iter().any(|x| x == l))
            })
            .map(|(_, _, v)| *v)
            .sum::<u64>()
    };
    assert_eq!(counter(names::REQUEST_COUNT, None), 2, "{counters:?}");
    assert_eq!(counter(names::REQUEST_SUCCESS, None), 1, "{counters:?}");
    for err in ["overloaded", "validation", "cancelled"] {
        assert_eq!(
            counter(names::REQUEST_FAILURE, Some(&format!("err={err}"))),
            1,
            "failures labelled {err}: {counters:?}"
        );
    }
    let samples = |name: &str| {
        histograms
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, len)| *len)
            .sum::<usize>()
    };
    for name in [
        names::REQUEST_QUEUE_DURATION,
        names::REQUEST_INFERENCE_DURATION,
        names::REQUEST_DURATION,
    ] {
        assert_eq!(samples(name), 1, "{name}: one per served request");
    }
    assert!(samples(names::BATCH_SIZE) >= 1);
    assert_eq!(
        samples(names::BATCH_SIZE),
        samples(names::BATCH_LATENT_TOKENS)
    );
    assert!(gauges.iter().any(|g| g == names::QUEUE_SIZE), "{gauges:?}");
}
