//! The typed HTTP client of swimlane's two APIs (docs/api.md), as a device uses them:
//! upload a batch (once, or retried until accepted), read a batch's status, wait until
//! it settles, download the model (conditionally, with its ETag). The demo, the replay,
//! the benchmarks, the chaos soak, its audit and the tests all speak HTTP through it.
use std::io::Read as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use swimlane_model::onnx::OnnxModel;
use swimlane_model::MicroModel;

/// One device: its user, its token, and where the two APIs are.
#[derive(Clone)]
pub struct Device {
    pub user: String,
    pub token: String,
    /// Base URL of the ingest API (`http://host:port`).
    pub ingest: String,
    /// Base URL of the publisher's model API.
    pub publisher: String,
    pub agent: ureq::Agent,
}

/// What one upload attempt got.
#[derive(Debug)]
pub enum Upload {
    /// 202: the batch is staged (or was already, for a retry of the same batch).
    Accepted(serde_json::Value),
    /// Worth retrying with the same batch id and body: a 5xx (`Retry-After`), or the
    /// connection failed.
    Retry(String),
}

/// A model download.
#[derive(Debug)]
pub enum Download {
    /// 304: the device's copy (the ETag it sent) is current.
    NotModified,
    /// 404: no model published for this user yet (the device runs the base model).
    NoModel,
    Model {
        version: u64,
        /// `ETag`, to send as `If-None-Match` next time.
        etag: Option<String>,
        /// `X-Model-Sha256`: the hash the bytes must have.
        sha256: Option<String>,
        bytes: Vec<u8>,
    },
}

/// An HTTP agent with the timeouts a device would use.
pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .build()
}

/// The text of an error answer, at most 500 bytes.
fn answer_text(r: ureq::Response) -> String {
    let mut b = String::new();
    let _ = r.into_reader().take(500).read_to_string(&mut b);
    b
}

impl Device {
    pub fn new(ingest: &str, publisher: &str, user: &str, token: &str) -> Device {
        Device {
            user: user.into(),
            token: token.into(),
            ingest: ingest.into(),
            publisher: publisher.into(),
            agent: agent(),
        }
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// One attempt to upload `body` (docs/batch-format.md). A refusal (4xx) is an
    /// error with the answer's text: retrying the same body cannot help.
    pub fn upload(&self, body: &[u8]) -> anyhow::Result<Upload> {
        let url = format!("{}/v1/users/{}/batches", self.ingest, self.user);
        match self
            .agent
            .post(&url)
            .set("Authorization", &self.bearer())
            .set("Content-Type", "application/json")
            .send_bytes(body)
        {
            Ok(r) if r.status() == 202 => Ok(Upload::Accepted(r.into_json()?)),
            Ok(r) => anyhow::bail!("POST {url}: unexpected {}", r.status()),
            // 503 (overloaded, store busy) and 429 (this user's uploads in flight): later.
            // A 429 `daily_cap` lasts until midnight UTC: an error, not worth retrying.
            Err(ureq::Error::Status(code, r)) if code >= 500 || code == 429 => {
                let text = answer_text(r);
                anyhow::ensure!(!text.contains("\"daily_cap\""), "POST {url}: {code} {text}");
                Ok(Upload::Retry(format!("{code} {text}")))
            }
            Err(ureq::Error::Status(code, r)) => {
                anyhow::bail!("POST {url}: {code} {}", answer_text(r))
            }
            Err(e) => Ok(Upload::Retry(e.to_string())),
        }
    }

    /// Upload `body` until it is accepted, retrying with the same body (the same batch
    /// id: ingest answers a retry as the first upload) every 50 ms; `in_flight` counts
    /// the attempts under way. Returns how many attempts were interrupted.
    pub fn upload_until_accepted(
        &self,
        body: &[u8],
        deadline: Instant,
        in_flight: Option<&AtomicUsize>,
    ) -> anyhow::Result<usize> {
        let mut interrupted = 0;
        loop {
            in_flight.inspect(|n| {
                n.fetch_add(1, Ordering::SeqCst);
            });
            let r = self.upload(body);
            in_flight.inspect(|n| {
                n.fetch_sub(1, Ordering::SeqCst);
            });
            match r? {
                Upload::Accepted(_) => return Ok(interrupted),
                Upload::Retry(why) => {
                    interrupted += 1;
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "{}: upload never accepted (last: {why})",
                        self.user
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One attempt to upload `body`; anything but 202 is an error.
    pub fn post_batch(&self, body: serde_json::Value) -> anyhow::Result<()> {
        match self.upload(&serde_json::to_vec(&body)?)? {
            Upload::Accepted(_) => Ok(()),
            Upload::Retry(why) => anyhow::bail!("{}: upload refused for now: {why}", self.user),
        }
    }

    /// GET `url` with the device's token, as JSON.
    pub fn get_json(&self, url: &str) -> anyhow::Result<serde_json::Value> {
        let r = self
            .agent
            .get(url)
            .set("Authorization", &self.bearer())
            .call()
            .map_err(|e| anyhow::anyhow!("GET {url}: {e}"))?;
        Ok(r.into_json()?)
    }

    /// The batch's status object (`status` is its word).
    pub fn status(&self, batch_id: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}/v1/users/{}/batches/{batch_id}", self.ingest, self.user);
        self.get_json(&url)
    }

    /// Poll the batch's status until it settles (published, rejected or deferred);
    /// returns the settled status.
    pub fn wait_settled(
        &self,
        batch_id: &str,
        deadline: Instant,
    ) -> anyhow::Result<serde_json::Value> {
        loop {
            let st = self.status(batch_id)?;
            if settled(st["status"].as_str().unwrap_or("")) {
                return Ok(st);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}/{batch_id}: not settled: {st}",
                self.user
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Download the user's model (safetensors), conditionally when `etag` is given.
    pub fn download(&self, etag: Option<&str>) -> anyhow::Result<Download> {
        self.download_as(etag, false)
    }

    /// [`Device::download`] as safetensors, or with `onnx` as the device's ONNX file
    /// (`?format=onnx`).
    pub fn download_as(&self, etag: Option<&str>, onnx: bool) -> anyhow::Result<Download> {
        let format = if onnx { "?format=onnx" } else { "" };
        let url = format!("{}/v1/users/{}/model{format}", self.publisher, self.user);
        let mut req = self.agent.get(&url).set("Authorization", &self.bearer());
        if let Some(e) = etag {
            req = req.set("If-None-Match", e);
        }
        match req.call() {
            Ok(r) if r.status() == 304 => Ok(Download::NotModified),
            Ok(r) => {
                let version = r
                    .header("x-model-version")
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("GET {url}: no X-Model-Version"))?;
                let etag = r.header("etag").map(str::to_string);
                let sha256 = r.header("x-model-sha256").map(str::to_string);
                let mut bytes = Vec::new();
                r.into_reader().read_to_end(&mut bytes)?;
                Ok(Download::Model {
                    version,
                    etag,
                    sha256,
                    bytes,
                })
            }
            Err(ureq::Error::Status(404, _)) => Ok(Download::NoModel),
            Err(e) => Err(anyhow::anyhow!("GET {url}: {e}")),
        }
    }

    /// The published model and its version, or `None` (the device runs the base).
    pub fn current_versioned(&self) -> anyhow::Result<Option<(MicroModel, u64)>> {
        match self.download(None)? {
            Download::Model { version, bytes, .. } => {
                Ok(Some((MicroModel::from_bytes(&bytes)?, version)))
            }
            Download::NoModel | Download::NotModified => Ok(None),
        }
    }

    /// The published model's ONNX file, what a phone runs (with the base-model fallback
    /// for windows the model does not know), and its version; `None`: the device runs
    /// the base.
    pub fn current_onnx_versioned(&self) -> anyhow::Result<Option<(OnnxModel, u64)>> {
        match self.download_as(None, true)? {
            Download::Model { version, bytes, .. } => {
                Ok(Some((OnnxModel::from_bytes(&bytes)?, version)))
            }
            Download::NoModel | Download::NotModified => Ok(None),
        }
    }

    /// The published model, or `None` (the device runs the base).
    pub fn current_model(&self) -> anyhow::Result<Option<MicroModel>> {
        Ok(self.current_versioned()?.map(|(m, _)| m))
    }

    /// How many versions the user has.
    pub fn versions(&self) -> anyhow::Result<usize> {
        let v = self.versions_json()?;
        Ok(v["versions"].as_array().map(|a| a.len()).unwrap_or(0))
    }

    /// `GET /v1/users/{user}/model/versions`: every version and the head.
    pub fn versions_json(&self) -> anyhow::Result<serde_json::Value> {
        self.get_json(&format!(
            "{}/v1/users/{}/model/versions",
            self.publisher, self.user
        ))
    }
}

/// Whether a batch status word is final for now: published, rejected, deferred or
/// retired.
pub fn settled(status: &str) -> bool {
    matches!(status, "published" | "rejected" | "deferred" | "retired")
}
