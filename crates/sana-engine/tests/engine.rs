//! The engine end to end against `FakeBackend`: batching, admission, deadlines, cancellation,
//! failures, panics, warm-up and shutdown.
//!
//! Nothing here waits on a timer to synchronise: batches are held back with a `Gate`, and "the
//! engine is idle again" is observed through `Engine::shutdown` draining (all admission slots
//! returned) or through a later request on the same single worker finishing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sana_engine::sana_backend::{Backend, BackendError, ModelInfo};
use sana_engine::testing::{Failure, FakeBackend, Gate, Latency, Outcome};
use sana_engine::{
    Engine, EngineConfig, EngineError, Event, GenerateRequest, Generation, StartError, WorkerState,
};
use tokio::task::JoinSet;

fn config(devices: usize) -> EngineConfig {
    EngineConfig {
        devices: (0..devices).map(|i| format!("fake:{i}")).collect(),
        max_concurrent_requests: 256,
        max_batch_images: 8,
        max_n: 4,
        warmup_steps: 0,
        ..EngineConfig::default()
    }
}

fn request(prompt: &str, width: u32, height: u32, n: u32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        n,
        width: Some(width),
        height: Some(height),
        steps: Some(2),
        seed: Some(seed),
        ..GenerateRequest::new(prompt)
    }
}

/// The answer holds exactly the fake's images for this request, in order.
fn assert_right_images(generation: &Generation, req: &GenerateRequest) {
    let seed = req.seed.expect("tests pass seeds");
    let n = req.n as u64;
    assert_eq!(
        generation.seeds,
        (0..n).map(|i| seed + i).collect::<Vec<_>>(),
        "seeds of `{}`",
        req.prompt
    );
    assert_eq!(
        generation.images.len(),
        req.n as usize,
        "n of `{}`",
        req.prompt
    );
    for (i, image) in generation.images.iter().enumerate() {
        let expected = FakeBackend::image_for(
            &req.prompt,
            seed + i as u64,
            req.width.expect("tests pass sizes"),
            req.height.expect("tests pass sizes"),
        );
        assert!(
            *image == expected,
            "image {i} of `{}` is not the one for its prompt and seed",
            req.prompt
        );
    }
}

async fn start(config: EngineConfig, fake: FakeBackend) -> Engine {
    Engine::start(config, fake.factory())
        .await
        .expect("the engine starts")
}

/// Holds the single worker and the prefetch slot with two gated batches of distinct keys, so
/// whatever is submitted next waits in the queue together.
fn block_worker_and_slot(engine: &Engine) -> Vec<sana_engine::GenerationStream> {
    vec![
        engine
            .submit(request("blocker-a", 32, 32, 1, 0))
            .expect("admitted"),
        engine
            .submit(request("blocker-b", 64, 32, 1, 0))
            .expect("admitted"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_mixed_requests_each_get_their_own_images() {
    let gate = Gate::closed();
    let fake = FakeBackend::new().with_gate(gate.clone());
    let log = fake.log();
    let engine = start(config(2), fake).await;

    let sizes = [(64, 64), (128, 64), (64, 128)];
    let mut requests = HashMap::new();
    let mut tasks = JoinSet::new();
    for i in 0..200u64 {
        let (width, height) = sizes[i as usize % 3];
        let req = GenerateRequest {
            steps: Some(2 + (i % 2) as u32),
            guidance_scale: Some(if i % 4 < 2 { 1.0 } else { 4.5 }),
            ..request(
                &format!("prompt {i}"),
                width,
                height,
                1 + (i % 4) as u32,
                i * 1000,
            )
        };
        let stream = engine.submit(req.clone()).expect("admitted");
        requests.insert(req.prompt.clone(), req.clone());
        tasks.spawn(async move { (req, stream.result().await) });
    }
    gate.open();

    let mut answered = 0;
    while let Some(joined) = tasks.join_next().await {
        let (req, result) = joined.expect("the task does not panic");
        let generation = result.unwrap_or_else(|err| panic!("`{}` failed: {err}", req.prompt));
        assert_right_images(&generation, &req);
        answered += 1;
    }
    assert_eq!(answered, 200);
    assert_eq!(engine.in_flight(), 0, "every admission slot came back");

    // Every request ran in exactly one batch, with batch mates of its key, within the budget.
    let limits = engine.limits();
    let mut runs: HashMap<String, usize> = HashMap::new();
    let batches = log.served();
    for batch in &batches {
        assert_eq!(batch.outcome, Outcome::Completed);
        assert!(batch.num_images() <= limits.max_images, "{batch:?}");
        if batch.items.len() > 1 {
            assert!(
                batch.num_images() * batch.key.latent_tokens_per_image()
                    <= limits.max_latent_tokens
            );
        }
        for item in &batch.items {
            *runs.entry(item.prompt.clone()).or_default() += 1;
            let req = &requests[&item.prompt];
            let valid = engine.validate(req.clone()).expect("valid");
            assert_eq!(
                batch.key, valid.key,
                "`{}` batched under another key",
                req.prompt
            );
            assert_eq!(item.n, req.n, "n was split");
        }
    }
    assert_eq!(runs.len(), 200, "every request reached the backend");
    assert!(
        runs.values().all(|&count| count == 1),
        "a request ran twice"
    );
    assert!(
        batches.iter().any(|b| b.items.len() > 1),
        "requests that piled up behind the gate were batched"
    );
    assert!(
        batches.iter().any(|b| b.device == "fake:0")
            && batches.iter().any(|b| b.device == "fake:1"),
        "both workers took batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_and_previews_are_streamed_in_order() {
    let engine = start(config(1), FakeBackend::new()).await;
    let req = GenerateRequest {
        steps: Some(4),
        previews: 3,
        ..request("a lighthouse", 64, 64, 2, 7)
    };
    let mut stream = engine.submit(req.clone()).expect("admitted");
    let mut events = Vec::new();
    while let Some(event) = stream.next_event().await {
        events.push(event);
    }
    let key = engine.validate(req.clone()).expect("valid").key;
    let mut expected = Vec::new();
    for step in 1..=4 {
        expected.push(Event::Progress { step, steps: 4 });
        if step < 4 {
            for image_index in 0..2 {
                expected.push(Event::Preview {
                    image_index,
                    step,
                    image: FakeBackend::preview_for(
                        &req.prompt,
                        7 + u64::from(image_index),
                        step,
                        &key,
                    ),
                });
            }
        }
    }
    let Some(Event::Done(result)) = events.pop() else {
        panic!("the last event is the answer");
    };
    assert_eq!(events, expected);
    assert_right_images(&result.expect("generated"), &req);
    assert!(
        stream.next_event().await.is_none(),
        "nothing after the answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_immediately() {
    let gate = Gate::closed();
    let engine = start(
        EngineConfig {
            max_concurrent_requests: 3,
            ..config(1)
        },
        FakeBackend::new().with_gate(gate.clone()),
    )
    .await;
    let streams: Vec<_> = (0..3)
        .map(|i| {
            engine
                .submit(request("held", 64, 64, 1, i))
                .expect("admitted")
        })
        .collect();
    assert_eq!(engine.in_flight(), 3);
    // Nothing runs (the gate is closed), so a wait here would hang rather than pass.
    let refused = engine.submit(request("one too many", 64, 64, 1, 9));
    assert_eq!(
        refused.err(),
        Some(EngineError::Overloaded {
            max_concurrent_requests: 3
        })
    );
    gate.open();
    for stream in streams {
        stream.result().await.expect("the admitted ones are served");
    }
    let again = request("after the rush", 64, 64, 1, 9);
    let generation = engine
        .generate(again.clone())
        .await
        .expect("admitted again");
    assert_right_images(&generation, &again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_times_out_and_its_batch_is_abandoned() {
    let gate = Gate::closed();
    let fake = FakeBackend::new().with_gate(gate.clone());
    let log = fake.log();
    let engine = start(
        EngineConfig {
            request_timeout: Duration::from_millis(300),
            ..config(1)
        },
        fake,
    )
    .await;
    let req = GenerateRequest {
        steps: Some(50),
        ..request("slow", 64, 64, 1, 1)
    };
    let result = engine.generate(req).await;
    assert_eq!(
        result,
        Err(EngineError::Timeout(Duration::from_millis(300)))
    );

    // Let the held batch run: it must stop at the first step, as nobody waits for it.
    gate.open();
    let report = engine.shutdown(Duration::from_secs(30)).await;
    assert!(report.drained, "{report:?}");
    let batches = log.served();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].outcome, Outcome::Cancelled);
    assert_eq!(batches[0].steps_run, 1, "stopped at the first step of 50");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_batch_stops_early_once_its_clients_are_gone() {
    let fake = FakeBackend::new().with_latency(Latency {
        per_step: Duration::from_millis(2),
        ..Latency::default()
    });
    let log = fake.log();
    let engine = start(config(1), fake).await;
    let req = GenerateRequest {
        steps: Some(100),
        ..request("abandoned", 64, 64, 1, 1)
    };
    let mut stream = engine.submit(req).expect("admitted");
    assert_eq!(
        stream.next_event().await,
        Some(Event::Progress {
            step: 1,
            steps: 100
        })
    );
    drop(stream);

    let report = engine.shutdown(Duration::from_secs(30)).await;
    assert!(report.drained, "{report:?}");
    let batches = log.served();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].outcome, Outcome::Cancelled);
    assert!(
        batches[0].steps_run < 100,
        "ran {} of 100 steps after the client left",
        batches[0].steps_run
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_on_while_one_of_its_requests_remains() {
    let gate = Gate::closed();
    let fake = FakeBackend::new()
        .with_gate(gate.clone())
        .with_latency(Latency {
            per_step: Duration::from_millis(1),
            ..Latency::default()
        });
    let log = fake.log();
    let engine = start(config(1), fake).await;
    let blockers = block_worker_and_slot(&engine);
    let steps = |r: GenerateRequest| GenerateRequest {
        steps: Some(20),
        ..r
    };
    let mut leaving = engine
        .submit(steps(request("leaving", 128, 128, 1, 1)))
        .expect("admitted");
    let staying_req = steps(request("staying", 128, 128, 1, 2));
    let staying = engine.submit(staying_req.clone()).expect("admitted");
    gate.open();
    for blocker in blockers {
        blocker.result().await.expect("served");
    }
    assert!(matches!(
        leaving.next_event().await,
        Some(Event::Progress { step: 1, .. })
    ));
    drop(leaving);
    let generation = staying
        .result()
        .await
        .expect("its batch mate left, it did not");
    assert_right_images(&generation, &staying_req);

    let shared = log
        .served()
        .into_iter()
        .find(|b| b.items.iter().any(|i| i.prompt == "staying"))
        .expect("recorded");
    assert_eq!(shared.items.len(), 2, "both waited in the queue together");
    assert_eq!(shared.outcome, Outcome::Completed);
    assert_eq!(shared.steps_run, 20);
}

/// Polls `done` every 5 ms for up to 10 s: for what the engine does on its worker thread after
/// answering (the test has nothing to await there).
async fn eventually(mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The worker tells its backend it is idle (the moment to hand back memory) once its queue has
/// stayed empty for a moment after the start and after a batch, never between a batch and the
/// ones queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_goes_idle_only_when_nothing_waits() {
    let (gate, release) = (Gate::closed(), Gate::closed());
    let fake = FakeBackend::new()
        .with_gate(gate.clone())
        .fail_on("held", Failure::Hang)
        .with_release(release.clone());
    let log = fake.log();
    let engine = start(config(1), fake).await;
    eventually(|| log.idles().len() == 1).await;
    // Three batches (distinct sizes): the first runs (gated), the second is formed for the free
    // worker, the third waits in the queue.
    let streams: Vec<_> = [("first", 32), ("held", 64), ("third", 96)]
        .into_iter()
        .map(|(prompt, width)| {
            engine
                .submit(request(prompt, width, 32, 1, 0))
                .expect("admitted")
        })
        .collect();
    eventually(|| engine.waiting() == 1).await;
    assert_eq!(
        engine.waiting(),
        1,
        "the third waits behind the formed batch"
    );
    gate.open();
    // The second holds after its first step; meanwhile the third is formed for the worker.
    eventually(|| engine.waiting() == 0).await;
    assert_eq!(engine.waiting(), 0, "the third is formed");
    release.open();
    for stream in streams {
        stream.result().await.expect("served");
    }
    eventually(|| log.idles().len() == 2).await;
    assert_eq!(
        log.idles(),
        vec![0, 3],
        "idle once started (no batch yet) and once after the three batches, not between them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_while_queued_never_reaches_the_backend() {
    let gate = Gate::closed();
    let fake = FakeBackend::new().with_gate(gate.clone());
    let log = fake.log();
    let engine = start(config(1), fake).await;
    let blockers = block_worker_and_slot(&engine);
    let dropped = engine
        .submit(request("never run", 128, 128, 1, 1))
        .expect("admitted");
    drop(dropped);
    let kept_req = request("kept", 128, 128, 1, 2);
    let kept = engine.submit(kept_req.clone()).expect("admitted");
    gate.open();
    for blocker in blockers {
        blocker.result().await.expect("served");
    }
    assert_right_images(&kept.result().await.expect("served"), &kept_req);
    assert!(
        log.served()
            .iter()
            .all(|b| b.items.iter().all(|i| i.prompt != "never run")),
        "the dropped request was run: {:?}",
        log.served()
    );
    let report = engine.shutdown(Duration::from_secs(30)).await;
    assert!(
        report.drained,
        "its admission slot was given back: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_error_fails_only_its_batch() {
    let gate = Gate::closed();
    let fake = FakeBackend::new()
        .with_gate(gate.clone())
        .fail_on("bad", Failure::Error);
    let log = fake.log();
    let engine = start(config(1), fake).await;
    let reqs = [
        request("good 1", 64, 64, 1, 1),
        request("bad", 128, 128, 1, 2),
        request("good 2", 128, 128, 1, 3),
        request("good 3", 128, 64, 1, 4),
        request("good 4", 64, 64, 1, 5),
    ];
    let streams: Vec<_> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).expect("admitted"))
        .collect();
    gate.open();
    let mut results = HashMap::new();
    for (req, stream) in reqs.iter().zip(streams) {
        results.insert(req.prompt.clone(), stream.result().await);
    }
    // Whoever shared the batch of "bad" failed with it; everyone else got their images.
    for batch in log.served() {
        let failed = batch.items.iter().any(|i| i.prompt == "bad");
        assert_eq!(
            batch.outcome,
            if failed {
                Outcome::Failed
            } else {
                Outcome::Completed
            }
        );
        for item in &batch.items {
            let result = &results[&item.prompt];
            if failed {
                assert!(
                    matches!(result, Err(EngineError::Backend(msg)) if msg.contains("injected failure")),
                    "`{}`: {result:?}",
                    item.prompt
                );
            } else {
                let req = reqs
                    .iter()
                    .find(|r| r.prompt == item.prompt)
                    .expect("known");
                assert_right_images(result.as_ref().expect("not in the failed batch"), req);
            }
        }
    }
    assert!(
        results["good 1"].is_ok(),
        "another key is never in the failed batch"
    );
    let after = request("after", 64, 64, 1, 9);
    assert_right_images(
        &engine.generate(after.clone()).await.expect("still serving"),
        &after,
    );
    assert!(engine.health().is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_backend_is_rebuilt_and_the_engine_keeps_serving() {
    let builds = Arc::new(AtomicUsize::new(0));
    let fake = FakeBackend::new().fail_on("boom", Failure::Panic);
    let factory = {
        let builds = Arc::clone(&builds);
        let make = fake.factory();
        move |device: &str| {
            builds.fetch_add(1, Ordering::SeqCst);
            make(device)
        }
    };
    let engine = Engine::start(config(1), factory)
        .await
        .expect("the engine starts");
    let result = engine.generate(request("boom", 64, 64, 1, 1)).await;
    assert!(
        matches!(&result, Err(EngineError::Backend(msg)) if msg.contains("panicked")),
        "{result:?}"
    );
    let after = request("after", 64, 64, 1, 2);
    assert_right_images(
        &engine.generate(after.clone()).await.expect("served"),
        &after,
    );
    assert_eq!(builds.load(Ordering::SeqCst), 2, "rebuilt once");
    let health = engine.health();
    assert_eq!(health.workers[0].restarts, 1);
    assert!(health.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_fails_its_health_check_after_an_error_is_rebuilt() {
    let builds = Arc::new(AtomicUsize::new(0));
    let fake = FakeBackend::new().fail_on("lose the device", Failure::Fatal);
    let factory = {
        let builds = Arc::clone(&builds);
        let make = fake.factory();
        move |device: &str| {
            builds.fetch_add(1, Ordering::SeqCst);
            make(device)
        }
    };
    let engine = Engine::start(config(1), factory)
        .await
        .expect("the engine starts");
    let result = engine
        .generate(request("lose the device", 64, 64, 1, 1))
        .await;
    assert!(matches!(result, Err(EngineError::Backend(_))), "{result:?}");
    let after = request("after", 64, 64, 1, 2);
    assert_right_images(
        &engine.generate(after.clone()).await.expect("served"),
        &after,
    );
    assert_eq!(builds.load(Ordering::SeqCst), 2, "rebuilt once");
    assert_eq!(engine.health().workers[0].restarts, 1);

    let engine2 = Engine::start(
        config(1),
        FakeBackend::new().fail_on("bad", Failure::Error).factory(),
    )
    .await
    .expect("the engine starts");
    let _ = engine2.generate(request("bad", 64, 64, 1, 1)).await;
    engine2
        .generate(request("after", 64, 64, 1, 2))
        .await
        .expect("served");
    assert_eq!(
        engine2.health().workers[0].restarts,
        0,
        "a plain error leaves a healthy backend alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_is_replaced_and_its_requests_are_answered() {
    let builds = Arc::new(AtomicUsize::new(0));
    let rebuild = Gate::closed();
    let release = Gate::closed();
    let fake = FakeBackend::new()
        .fail_on("stuck", Failure::Hang)
        .with_release(release.clone())
        .with_latency(Latency {
            per_step: Duration::from_millis(60),
            ..Latency::default()
        });
    let log = fake.log();
    let factory = {
        let builds = Arc::clone(&builds);
        let rebuild = rebuild.clone();
        let make = fake.factory();
        move |device: &str| {
            // The replacement waits for the test, so that its `restarting` state can be seen.
            if builds.fetch_add(1, Ordering::SeqCst) > 0 {
                rebuild.wait();
            }
            make(device)
        }
    };
    let config = EngineConfig {
        watchdog_timeout: Some(Duration::from_millis(300)),
        ..config(1)
    };
    let engine = Engine::start(config, factory)
        .await
        .expect("the engine starts");

    // Slow steps are not a hang: 8 steps of 60 ms outlast the timeout, each step does not.
    let slow = GenerateRequest {
        steps: Some(8),
        ..request("slow", 64, 64, 1, 1)
    };
    assert_right_images(&engine.generate(slow.clone()).await.expect("served"), &slow);
    assert_eq!(engine.health().workers[0].restarts, 0);

    let result = engine.generate(request("stuck", 64, 64, 2, 1)).await;
    assert!(
        matches!(&result, Err(EngineError::WorkerHung { device, .. }) if device == "fake:0"),
        "{result:?}"
    );
    let health = engine.health();
    assert_eq!(health.workers[0].state, WorkerState::Restarting);
    assert_eq!(health.workers[0].restarts, 1);
    assert!(!health.is_ready(), "not ready while the replacement builds");
    // Admitted meanwhile, served by the replacement.
    let waiting = request("after", 64, 64, 1, 2);
    let pending = engine.submit(waiting.clone()).expect("admitted");
    rebuild.open();
    assert_right_images(&pending.result().await.expect("served"), &waiting);
    assert!(engine.health().is_ready());
    assert_eq!(builds.load(Ordering::SeqCst), 2, "one replacement");

    // The stuck thread comes back: nobody waits for its batch, which stops at the next step,
    // and it leaves without touching the new worker's slot.
    release.open();
    let outcome = || {
        log.served()
            .into_iter()
            .find(|b| b.items[0].prompt == "stuck")
            .map(|b| b.outcome)
    };
    for _ in 0..500 {
        if outcome() != Some(Outcome::Hung) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(outcome(), Some(Outcome::Cancelled));
    let again = request("again", 64, 64, 1, 3);
    assert_right_images(
        &engine.generate(again.clone()).await.expect("served"),
        &again,
    );
    // The worker turns ready just after it answers; the stuck thread must not have changed that.
    for _ in 0..500 {
        if engine.health().workers[0].state == WorkerState::Ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let health = engine.health();
    assert_eq!(health.workers[0].state, WorkerState::Ready);
    assert_eq!(health.workers[0].restarts, 1);
    let report = engine.shutdown(Duration::from_secs(5)).await;
    assert!(report.drained && report.workers_stopped, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_watchdog_a_hung_worker_holds_its_requests_until_their_timeout() {
    let fake = FakeBackend::new().fail_on("stuck", Failure::Hang);
    let config = EngineConfig {
        watchdog_timeout: None,
        request_timeout: Duration::from_millis(500),
        ..config(1)
    };
    let engine = start(config, fake).await;
    let result = engine.generate(request("stuck", 64, 64, 1, 1)).await;
    assert!(matches!(result, Err(EngineError::Timeout(_))), "{result:?}");
    assert_eq!(engine.health().workers[0].state, WorkerState::Busy);
}

/// Builds fine the first time per device and fails every rebuild.
fn fails_on_rebuild(
    fake: FakeBackend,
) -> impl Fn(&str) -> Result<Box<dyn Backend>, BackendError> + Send + Sync + 'static {
    let builds = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let make = fake.factory();
    move |device: &str| {
        let mut builds = builds.lock().expect("not poisoned");
        let count = builds.entry(device.to_owned()).or_default();
        *count += 1;
        if *count > 1 {
            return Err(BackendError::Internal("device lost".into()));
        }
        make(device)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_be_rebuilt_is_unhealthy_and_the_others_serve() {
    let fake = FakeBackend::new().fail_on("boom", Failure::Panic);
    let engine = Engine::start(config(2), fails_on_rebuild(fake))
        .await
        .expect("the engine starts");
    let result = engine.generate(request("boom", 64, 64, 1, 1)).await;
    assert!(matches!(result, Err(EngineError::Backend(_))), "{result:?}");
    // The failed worker marks itself unhealthy right after answering; meanwhile, and after,
    // the other one serves. Real requests, not sleeps, give it the time.
    for i in 0.. {
        let req = request(&format!("after {i}"), 64, 64, 1, i);
        assert_right_images(&engine.generate(req.clone()).await.expect("served"), &req);
        let unhealthy = engine
            .health()
            .workers
            .iter()
            .any(|w| w.state == WorkerState::Unhealthy);
        if unhealthy && i >= 10 {
            break;
        }
        assert!(
            i < 10_000,
            "the worker that panicked never became unhealthy"
        );
    }
    let health = engine.health();
    let states: Vec<_> = health.workers.iter().map(|w| w.state).collect();
    assert!(
        states.contains(&WorkerState::Unhealthy),
        "the worker that panicked could not be rebuilt: {states:?}"
    );
    assert!(health.is_ready(), "the other worker serves: {states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_worker_left_requests_fail_as_unhealthy() {
    let fake = FakeBackend::new().fail_on("boom", Failure::Panic);
    let engine = Engine::start(config(1), fails_on_rebuild(fake))
        .await
        .expect("the engine starts");
    let _ = engine.generate(request("boom", 64, 64, 1, 1)).await;
    // Whether refused at admission or failed in the queue, the answer is the same.
    let result = engine.generate(request("after", 64, 64, 1, 2)).await;
    assert_eq!(result, Err(EngineError::Unhealthy));
    let result = engine.generate(request("after", 64, 64, 1, 2)).await;
    assert_eq!(result, Err(EngineError::Unhealthy));
    assert!(!engine.health().is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_and_refuses_new_ones() {
    let fake = FakeBackend::new().with_latency(Latency {
        per_batch: Duration::from_millis(5),
        ..Latency::default()
    });
    let engine = start(config(2), fake).await;
    let reqs: Vec<_> = (0..20)
        .map(|i| request(&format!("draining {i}"), 64, 64, 1 + i % 2, u64::from(i)))
        .collect();
    let mut tasks = JoinSet::new();
    for req in &reqs {
        let stream = engine.submit(req.clone()).expect("admitted");
        let req = req.clone();
        tasks.spawn(async move { (req, stream.result().await) });
    }
    let report = engine.shutdown(Duration::from_secs(30)).await;
    assert!(report.drained && report.workers_stopped, "{report:?}");
    assert_eq!(report.cancelled, 0);
    let mut answered = 0;
    while let Some(joined) = tasks.join_next().await {
        let (req, result) = joined.expect("the task does not panic");
        assert_right_images(&result.expect("drained, not cancelled"), &req);
        answered += 1;
    }
    assert_eq!(answered, 20);
    assert_eq!(
        engine.submit(request("late", 64, 64, 1, 1)).err(),
        Some(EngineError::ShuttingDown)
    );
    let health = engine.health();
    assert!(health.shutting_down && !health.is_ready());
    assert!(health
        .workers
        .iter()
        .all(|w| w.state == WorkerState::Stopped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_its_grace_period_cancels_what_is_left() {
    let fake = FakeBackend::new().with_latency(Latency {
        per_step: Duration::from_millis(20),
        ..Latency::default()
    });
    let log = fake.log();
    let engine = start(config(1), fake).await;
    let long = |prompt: &str, width| GenerateRequest {
        steps: Some(100),
        ..request(prompt, width, 64, 1, 1)
    };
    let mut running = engine.submit(long("running", 64)).expect("admitted");
    assert!(matches!(
        running.next_event().await,
        Some(Event::Progress { .. })
    ));
    let queued = engine.submit(long("queued", 128)).expect("admitted");

    let report = engine.shutdown(Duration::from_millis(100)).await;
    assert!(!report.drained, "{report:?}");
    assert_eq!(report.cancelled, 2);
    assert_eq!(running.result().await, Err(EngineError::ShuttingDown));
    assert_eq!(queued.result().await, Err(EngineError::ShuttingDown));
    let first = &log.served()[0];
    assert_eq!(first.outcome, Outcome::Cancelled);
    assert!(first.steps_run < 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_runs_at_the_largest_batch() {
    let info = ModelInfo {
        max_width: 256,
        max_height: 128,
        ..FakeBackend::default_info()
    };
    let fake = FakeBackend::new().with_info(info);
    let log = fake.log();
    let tokens_per_image = 2 * (256 / 32) * (128 / 32);
    let _engine = start(
        EngineConfig {
            warmup_steps: 2,
            max_batch_images: 8,
            max_batch_latent_tokens: Some(3 * tokens_per_image),
            ..config(2)
        },
        fake,
    )
    .await;
    let batches = log.batches();
    assert_eq!(
        batches.len(),
        2,
        "one warm-up per worker, before start returns"
    );
    for batch in batches {
        assert!(batch.is_warmup());
        assert_eq!((batch.key.width, batch.key.height), (256, 128));
        assert!(batch.key.cfg, "the default guidance 4.5 runs CFG");
        assert_eq!(batch.num_images(), 3, "as many as the token budget allows");
        assert_eq!(batch.outcome, Outcome::Completed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_reports_bad_configuration_and_backends_that_fail() {
    let err = Engine::start(
        EngineConfig {
            max_n: 9,
            ..config(1)
        },
        FakeBackend::new().factory(),
    )
    .await
    .expect_err("max_n above the batch size");
    assert!(
        matches!(&err, StartError::InvalidConfig(msg) if msg.contains("--max-n")),
        "{err}"
    );

    let err = Engine::start(config(2), |device: &str| {
        if device == "fake:1" {
            Err(BackendError::Internal("no such device".into()))
        } else {
            FakeBackend::new().factory()(device)
        }
    })
    .await
    .expect_err("one device fails");
    assert!(
        matches!(&err, StartError::Worker { device, .. } if device == "fake:1"),
        "{err}"
    );

    let err = Engine::start(
        EngineConfig {
            warmup_steps: 1,
            ..config(1)
        },
        FakeBackend::new()
            .with_info(ModelInfo {
                max_width: 64,
                max_height: 64,
                ..FakeBackend::default_info()
            })
            .fail_on("warm-up", Failure::Panic)
            .factory(),
    )
    .await
    .expect_err("warm-up panics");
    assert!(matches!(err, StartError::Worker { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_refused_at_submit() {
    let engine = start(config(1), FakeBackend::new()).await;
    let err = engine
        .submit(request("odd size", 100, 64, 1, 1))
        .expect_err("not a multiple of 32");
    match err {
        EngineError::Validation(v) => assert_eq!(v.param, Some("width")),
        other => panic!("expected a validation error, got {other:?}"),
    }
    assert_eq!(engine.in_flight(), 0, "no admission slot taken");
}

/// Edits share a batch only with edits of the same size, steps and strength: the key carries the
/// strength, and text-to-image work never joins them.
#[tokio::test]
async fn edits_batch_only_with_compatible_edits() {
    use sana_engine::sana_backend::Image;
    use sana_engine::EditRequest;
    let fake = FakeBackend::new();
    let log = fake.log();
    let gate = Gate::closed();
    let engine = start(
        EngineConfig {
            max_batch_images: 16,
            ..config(1)
        },
        fake.with_gate(gate.clone()),
    )
    .await;
    let edit = |strength: f32| EditRequest {
        image: Image {
            width: 64,
            height: 64,
            rgb8: vec![9; 64 * 64 * 3],
        },
        mask: None,
        strength,
        preserve_unmasked: true,
    };
    // The first request holds the worker; the rest queue up together.
    let first = engine.submit(request("hold", 32, 32, 1, 0)).unwrap();
    let mut streams = Vec::new();
    for (k, strength) in [Some(0.5), Some(0.5), Some(0.8), None, Some(0.5)]
        .into_iter()
        .enumerate()
    {
        let mut req = request(&format!("r{k}"), 64, 64, 1, k as u64);
        req.steps = Some(10);
        req.edit = strength.map(edit);
        streams.push(engine.submit(req).unwrap());
    }
    gate.open();
    first.result().await.unwrap();
    for s in streams {
        s.result().await.unwrap();
    }
    let batches: Vec<(Option<u16>, Vec<String>, u32)> = log
        .served()
        .iter()
        .skip(1)
        .map(|b| {
            assert!(b
                .items
                .iter()
                .all(|i| i.edit.is_some() == b.key.strength_permille.is_some()));
            (
                b.key.strength_permille,
                b.items.iter().map(|i| i.prompt.clone()).collect(),
                b.steps_run,
            )
        })
        .collect();
    assert_eq!(
        batches,
        [
            (Some(500), vec!["r0".into(), "r1".into(), "r4".into()], 5),
            (Some(800), vec!["r2".into()], 8),
            (None, vec!["r3".into()], 10),
        ],
        "one batch per strength, in queue order of their first request; an edit runs steps × strength steps"
    );
}
