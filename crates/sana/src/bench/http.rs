//! `sana bench http`: a load test of a running `sana serve`.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Debug, Args)]
pub struct HttpBench {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Requests in all.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Clients sending at once (each waits for its answer before the next request).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// `size` of each request.
    #[arg(long, default_value = "64x64")]
    size: String,
    /// Images per request (`n`).
    #[arg(long, default_value_t = 1)]
    n: u32,
    #[arg(
        long,
        default_value = "a small red square at the top on a white background"
    )]
    prompt: String,
    #[arg(long, env = "SANA_API_KEY")]
    api_key: Option<String>,
}

/// How one request ended.
enum Answer {
    /// 200 with `n` decodable images of the requested size.
    Images,
    /// Another status with a well-formed OpenAI error envelope.
    Refused(u16),
    /// Anything else: transport error, bad JSON, missing or undecodable images.
    Malformed(String),
}

impl HttpBench {
    fn one(&self, agent: &ureq::Agent, k: usize, (w, h): (u32, u32)) -> Answer {
        use base64::Engine as _;
        let body = serde_json::json!({
            "prompt": self.prompt, "size": self.size, "n": self.n,
            "response_format": "b64_json", "seed": k,
        });
        let mut req = agent.post(&format!("{}/v1/images/generations", self.url));
        if let Some(key) = &self.api_key {
            req = req.set("authorization", &format!("Bearer {key}"));
        }
        let (status, text) = match req.send_json(body) {
            Ok(r) => (r.status(), r.into_string()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string()),
            Err(e) => return Answer::Malformed(format!("transport: {e}")),
        };
        let v: serde_json::Value = match text.map(|t| serde_json::from_str(&t)) {
            Ok(Ok(v)) => v,
            _ => return Answer::Malformed(format!("status {status}: body is not JSON")),
        };
        if status != 200 {
            return if v["error"]["message"].is_string() && v["error"]["type"].is_string() {
                Answer::Refused(status)
            } else {
                Answer::Malformed(format!("status {status} without an error envelope: {v}"))
            };
        }
        let Some(data) = v["data"].as_array() else {
            return Answer::Malformed(format!("200 without `data`: {v}"));
        };
        if data.len() != self.n as usize {
            return Answer::Malformed(format!("{} images for n = {}", data.len(), self.n));
        }
        for d in data {
            let decoded = d["b64_json"]
                .as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|bytes| image::load_from_memory(&bytes).ok());
            match decoded {
                Some(img) if (img.width(), img.height()) == (w, h) => {}
                Some(img) => {
                    return Answer::Malformed(format!(
                        "image is {}x{}, asked {w}x{h}",
                        img.width(),
                        img.height()
                    ))
                }
                None => return Answer::Malformed("undecodable image".into()),
            }
        }
        Answer::Images
    }

    pub fn run(&self) -> Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Mutex;

        let (w, h) = self
            .size
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
            .with_context(|| format!("--size {:?}: expected WxH", self.size))?;
        let next = AtomicUsize::new(0);
        let results = Mutex::new(Vec::with_capacity(self.requests));
        let start = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..self.concurrency.max(1) {
                scope.spawn(|| {
                    let agent = ureq::AgentBuilder::new()
                        .timeout(std::time::Duration::from_secs(600))
                        .build();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= self.requests {
                            break;
                        }
                        let t0 = Instant::now();
                        let answer = self.one(&agent, k, (w, h));
                        let ms = t0.elapsed().as_secs_f64() * 1e3;
                        results
                            .lock()
                            .expect("no panics while held")
                            .push((ms, answer));
                    }
                });
            }
        });
        let wall = start.elapsed().as_secs_f64();
        let results = results.into_inner().expect("no panics while held");
        let mut ok: Vec<f64> = Vec::new();
        let mut refused = std::collections::BTreeMap::<u16, usize>::new();
        let mut malformed = Vec::new();
        for (ms, answer) in &results {
            match answer {
                Answer::Images => ok.push(*ms),
                Answer::Refused(code) => *refused.entry(*code).or_default() += 1,
                Answer::Malformed(why) => malformed.push(why.clone()),
            }
        }
        ok.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            ok.get(((ok.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
        };
        println!(
            "{} requests ({} images each, {}) from {} clients in {wall:.1} s against {}",
            results.len(),
            self.n,
            self.size,
            self.concurrency,
            self.url
        );
        println!(
            "  answered with images: {} ({:.1} images/s, {:.1} requests/s)",
            ok.len(),
            (ok.len() * self.n as usize) as f64 / wall,
            ok.len() as f64 / wall
        );
        if let (Some(p50), Some(p90), Some(p99), Some(max)) =
            (pct(0.5), pct(0.9), pct(0.99), ok.last())
        {
            println!("  latency ms: p50 {p50:.0}, p90 {p90:.0}, p99 {p99:.0}, max {max:.0}");
        }
        println!("  refused with an error envelope: {refused:?}");
        println!("  malformed or lost: {}", malformed.len());
        for why in malformed.iter().take(5) {
            println!("    {why}");
        }
        if results.len() != self.requests || !malformed.is_empty() {
            bail!(
                "{} of {} requests did not get exactly one well-formed answer",
                self.requests - results.len() + malformed.len(),
                self.requests
            );
        }
        Ok(())
    }
}
