//! HTTP from a test, as a client would speak it (ureq): JSON requests, OpenAI SSE streams,
//! and streams left running on a thread that can hang up mid-stream.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// POSTs the JSON `body` to `url`; returns the status and the whole body (a stream is read
/// to its end).
pub fn post(url: &str, body: &str) -> anyhow::Result<(u16, String)> {
    post_with(url, body, &[])
}

/// [`post`] with extra `headers`.
pub fn post_with(url: &str, body: &str, headers: &[(&str, &str)]) -> anyhow::Result<(u16, String)> {
    let mut req = agent(Duration::from_secs(120))
        .post(url)
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut r = req.send(body)?;
    let code = r.status().as_u16();
    Ok((code, r.body_mut().read_to_string()?))
}

/// GETs `url`; returns the status and the body.
pub fn get(url: &str) -> anyhow::Result<(u16, String)> {
    let mut r = agent(Duration::from_secs(10)).get(url).call()?;
    let code = r.status().as_u16();
    Ok((code, r.body_mut().read_to_string()?))
}

/// A GET or DELETE of `url` with `headers`; the status and the body.
pub fn call_with(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    let a = agent(Duration::from_secs(120));
    let mut req = match method {
        "DELETE" => a.delete(url),
        _ => a.get(url),
    };
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut r = req.call()?;
    let code = r.status().as_u16();
    Ok((code, r.body_mut().read_to_string()?))
}

/// GETs `url` as JSON.
pub fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    let (code, body) = get(url)?;
    anyhow::ensure!(code == 200, "GET {url}: {code} {body}");
    Ok(serde_json::from_str(&body)?)
}

/// The value of the Prometheus sample `name` (with its labels, if any) in `text`.
pub fn metric(text: &str, name: &str) -> anyhow::Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .ok_or_else(|| anyhow::anyhow!("no {name} in {text}"))?
        .trim()
        .parse()
        .map_err(Into::into)
}

/// The text of an OpenAI SSE stream: `data:` chunks concatenated until `[DONE]`; errors if
/// the stream carried an error event or never finished.
pub fn sse_text(body: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    let mut done = false;
    for line in body.lines() {
        if line.starts_with("event: error") {
            anyhow::bail!("error event: {body}");
        }
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        let c = &v["choices"][0];
        if let Some(t) = c["text"].as_str().or(c["delta"]["content"].as_str()) {
            text.push_str(t);
        }
    }
    anyhow::ensure!(done, "stream did not end with [DONE]: {body}");
    Ok(text)
}

/// A greedy completion through the coordinator at `url`: its text (streamed or not).
pub fn completion(url: &str, prompt: &str, n: u32, stream: bool) -> anyhow::Result<String> {
    completion_with(
        url,
        serde_json::json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}),
    )
}

/// A completion with the request `body`: its text (streamed or not).
pub fn completion_with(url: &str, body: serde_json::Value) -> anyhow::Result<String> {
    let stream = body["stream"].as_bool().unwrap_or(false);
    let (code, text) = post(&format!("{url}/v1/completions"), &body.to_string())?;
    anyhow::ensure!(code == 200, "status {code}: {text}");
    if stream {
        sse_text(&text)
    } else {
        let v: serde_json::Value = serde_json::from_str(&text)?;
        anyhow::ensure!(
            v["usage"]["completion_tokens"].as_u64().is_some(),
            "no usage: {text}"
        );
        Ok(v["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }
}

/// A streamed request read on its own thread, chunk by chunk, as a client reads it.
pub struct BackgroundStream {
    hang_up: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<(u16, String)>>>,
}

impl BackgroundStream {
    /// POSTs `body` to `url` and reads the reply on a thread, for at most `within`.
    pub fn start(url: &str, body: &serde_json::Value, within: Duration) -> Self {
        let hang_up = Arc::new(AtomicBool::new(false));
        let stop = hang_up.clone();
        let (url, body) = (url.to_string(), body.to_string());
        let thread = std::thread::spawn(move || {
            let r = agent(within)
                .post(&url)
                .header("content-type", "application/json")
                .send(body.as_str())?;
            let code = r.status().as_u16();
            let mut reader = r.into_body().into_reader();
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            // returning drops the reader: a hang-up closes the connection here
            Ok((code, String::from_utf8(out)?))
        });
        BackgroundStream {
            hang_up,
            thread: Some(thread),
        }
    }

    /// A greedy completion of `max_tokens` that ignores end-of-generation, streamed.
    pub fn completion(url: &str, max_tokens: u32, within: Duration) -> Self {
        let body = serde_json::json!({"prompt": "Count slowly: 1, 2, 3,", "max_tokens": max_tokens,
                                      "temperature": 0, "stream": true, "ignore_eos": true});
        Self::start(&format!("{url}/v1/completions"), &body, within)
    }

    /// Waits for the stream to end; its status and body.
    pub fn finish(mut self) -> anyhow::Result<(u16, String)> {
        self.thread
            .take()
            .ok_or_else(|| anyhow::anyhow!("already finished"))?
            .join()
            .map_err(|_| anyhow::anyhow!("the stream's thread panicked"))?
    }

    /// Hangs up mid-stream, as a client that goes away; returns once the connection is
    /// closed (at the next chunk the server sends).
    pub fn hang_up(mut self) {
        self.hang_up.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for BackgroundStream {
    /// A stream dropped unfinished hangs up without waiting (its server may be stopped).
    fn drop(&mut self) {
        self.hang_up.store(true, Ordering::Relaxed);
    }
}

/// Runs `jobs` on threads of their own, all at once; their results in order.
pub fn all_at_once<T: Send>(
    jobs: Vec<Box<dyn FnOnce() -> anyhow::Result<T> + Send + '_>>,
) -> anyhow::Result<Vec<T>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = jobs.into_iter().map(|j| s.spawn(j)).collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("thread panicked"))
                    .and_then(|r| r)
            })
            .collect()
    })
}
