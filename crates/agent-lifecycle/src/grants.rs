//! The grant client: obtains, renews and revokes this instance's database
//! grants through keelson's authorization API.
//!
//! ```text
//! POST   {url}/api/v1/grants {app, env, instance, uid, ip} → {lease_id, ttl_s, grants}
//! POST   {url}/api/v1/grants/{lease_id}/renew
//! DELETE {url}/api/v1/grants/{lease_id}
//! ```
//!
//! When 500 pods start at once the API answers `429`/`503` with
//! `Retry-After`; the client then waits at least that long plus jitter, and
//! backs off exponentially with full jitter on network errors, so retries
//! spread out instead of arriving in waves. Other `4xx` answers are final.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::{self, Url};
use crate::output::Output;

/// Errors of the grant client.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The configured URL cannot be used.
    #[error("invalid authorization url: {0}")]
    Url(String),
    /// The token file cannot be read.
    #[error("cannot read the token {path}: {error}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// The API refused the request for good.
    #[error("the authorization API refused {what}: HTTP {status}: {body}")]
    Refused {
        /// Which call.
        what: &'static str,
        /// The status.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The API's answer cannot be understood.
    #[error("the authorization API answered {what} with an invalid body: {error}")]
    InvalidResponse {
        /// Which call.
        what: &'static str,
        /// Why the body was rejected.
        error: String,
    },
    /// Retries ran out at the deadline.
    #[error("gave up on {what} after {attempts} attempts in {elapsed_s}s; last error: {last}")]
    Deadline {
        /// Which call.
        what: &'static str,
        /// How many attempts were made.
        attempts: u32,
        /// Seconds spent.
        elapsed_s: u64,
        /// The last failure.
        last: String,
    },
}

/// Result of the grant client.
pub type Result<T, E = GrantError> = std::result::Result<T, E>;

/// What `init` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantRequest {
    /// The app.
    pub app: String,
    /// The environment.
    pub env: String,
    /// The instance (pod) name.
    pub instance: String,
    /// The pod's UID.
    pub uid: String,
    /// The pod's IP.
    pub ip: String,
}

/// A lease on this instance's grants, as recorded in `run/lease.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// The lease to renew and revoke.
    pub lease_id: String,
    /// Seconds the lease lives without renewal.
    pub ttl_s: u64,
    /// The grants as the API described them.
    #[serde(default)]
    pub grants: serde_json::Value,
}

/// Outcome of a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed; the ttl (the API's, or the old one when it sent none).
    Renewed {
        /// Seconds until the lease expires.
        ttl_s: u64,
    },
    /// The API no longer knows the lease (expired or collected).
    Gone,
}

/// The client for one authorization endpoint.
#[derive(Debug, Clone)]
pub struct GrantClient {
    url: Url,
    token_path: PathBuf,
    request_timeout: Duration,
    output: Output,
}

/// One attempt's verdict.
enum Attempt<T> {
    Done(T),
    Retry {
        error: String,
        after: Option<Duration>,
    },
    Fail(GrantError),
}

impl GrantClient {
    /// A client for `url` (the base; `/api/v1/grants` is appended) with the
    /// bearer token read from `token_path` on every call (projected tokens
    /// rotate).
    pub fn new(url: &str, token_path: impl Into<PathBuf>, output: Output) -> Result<Self> {
        Ok(GrantClient {
            url: Url::parse(url).map_err(GrantError::Url)?,
            token_path: token_path.into(),
            request_timeout: Duration::from_secs(10),
            output,
        })
    }

    /// Obtains the grants, retrying until `deadline`.
    pub fn acquire(&self, request: &GrantRequest, deadline: Instant) -> Result<Lease> {
        let body = serde_json::to_vec(request).unwrap_or_default();
        self.retrying("grant", deadline, || {
            let resp = match self.call("POST", "", Some(&body), "grant") {
                Ok(resp) => resp,
                Err(error) => return Attempt::Retry { error, after: None },
            };
            if !matches!(resp.status, 200 | 201) {
                return classify(resp, "grant");
            }
            match serde_json::from_slice::<Lease>(&resp.body) {
                Ok(lease) => Attempt::Done(lease),
                Err(e) => Attempt::Fail(GrantError::InvalidResponse {
                    what: "grant",
                    error: e.to_string(),
                }),
            }
        })
    }

    /// Renews `lease_id` once (the caller's loop decides when to try again).
    pub fn renew(&self, lease_id: &str, current_ttl_s: u64) -> Result<Renewal> {
        let path = format!("/{}/renew", encode(lease_id));
        let resp = self
            .call("POST", &path, None, "renew")
            .map_err(|e| GrantError::Deadline {
                what: "renew",
                attempts: 1,
                elapsed_s: 0,
                last: e,
            })?;
        match resp.status {
            200..=299 => {
                let ttl_s = serde_json::from_slice::<serde_json::Value>(&resp.body)
                    .ok()
                    .and_then(|v| v.get("ttl_s").and_then(|t| t.as_u64()))
                    .unwrap_or(current_ttl_s);
                Ok(Renewal::Renewed { ttl_s })
            }
            404 | 410 => Ok(Renewal::Gone),
            status => Err(GrantError::Refused {
                what: "renew",
                status,
                body: snippet(&resp.body),
            }),
        }
    }

    /// Revokes `lease_id`, retrying until `deadline`. An unknown lease counts
    /// as revoked, so revoking is idempotent.
    pub fn revoke(&self, lease_id: &str, deadline: Instant) -> Result<()> {
        let path = format!("/{}", encode(lease_id));
        self.retrying("revoke", deadline, || {
            match self.call("DELETE", &path, None, "revoke") {
                Ok(resp) if (200..300).contains(&resp.status) || resp.status == 404 => {
                    Attempt::Done(())
                }
                Ok(resp) => classify(resp, "revoke"),
                Err(error) => Attempt::Retry { error, after: None },
            }
        })
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        what: &'static str,
    ) -> std::result::Result<http::Response, String> {
        let token = std::fs::read_to_string(&self.token_path)
            .map_err(|e| format!("cannot read the token {}: {e}", self.token_path.display()))?;
        let auth = format!("Bearer {}", token.trim());
        let full = format!("{}/api/v1/grants{path}", self.url.base_path);
        http::send(&http::Request {
            method,
            host: &self.url.host,
            port: self.url.port,
            path: &full,
            headers: &[("Authorization", &auth), ("Accept", "application/json")],
            body,
            timeout: self.request_timeout,
            read_body: true,
        })
        .map_err(|e| {
            format!(
                "{what} request to {}:{} failed: {e}",
                self.url.host, self.url.port
            )
        })
    }

    fn retrying<T>(
        &self,
        what: &'static str,
        deadline: Instant,
        mut attempt: impl FnMut() -> Attempt<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let mut backoff = Backoff::new();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (error, after) = match attempt() {
                Attempt::Done(v) => return Ok(v),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry { error, after } => (error, after),
            };
            let wait = backoff.next(after);
            let give_up = GrantError::Deadline {
                what,
                attempts,
                elapsed_s: started.elapsed().as_secs(),
                last: error.clone(),
            };
            if Instant::now()
                .checked_add(wait)
                .is_none_or(|at| at >= deadline)
            {
                return Err(give_up);
            }
            self.output.event(
                "grant_retry",
                &[
                    ("call", json!(what)),
                    ("attempt", json!(attempts)),
                    ("error", json!(error)),
                    ("retry_in_ms", json!(wait.as_millis() as u64)),
                ],
            );
            std::thread::sleep(wait);
        }
    }
}

fn classify<T>(resp: http::Response, what: &'static str) -> Attempt<T> {
    match resp.status {
        429 | 502 | 503 | 504 => Attempt::Retry {
            error: format!("HTTP {}: {}", resp.status, snippet(&resp.body)),
            after: resp
                .header("retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s.min(Backoff::MAX_RETRY_AFTER_S))),
        },
        status if status >= 500 => Attempt::Retry {
            error: format!("HTTP {status}: {}", snippet(&resp.body)),
            after: None,
        },
        status => Attempt::Fail(GrantError::Refused {
            what,
            status,
            body: snippet(&resp.body),
        }),
    }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.chars().take(300).collect()
}

/// Percent-encodes everything but unreserved characters, for a path segment.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// Exponential backoff with full jitter, honouring a server's `Retry-After`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    /// First retry after up to 200 ms, doubling to at most 10 s.
    pub const INITIAL: Duration = Duration::from_millis(200);
    /// The cap of the exponential part.
    pub const MAX: Duration = Duration::from_secs(10);
    /// The longest `Retry-After` honoured, in seconds: the header is the
    /// server's number, and the wait is added to clocks.
    pub const MAX_RETRY_AFTER_S: u64 = 300;

    /// A fresh backoff.
    pub fn new() -> Self {
        Backoff {
            next: Self::INITIAL,
        }
    }

    /// The wait before the next attempt: uniformly random in
    /// `[0, exponential]`, or — when the server named a delay — that delay
    /// plus up to half of it again, so a crowd told "retry in 5 s" does not
    /// come back in the same millisecond.
    pub fn next(&mut self, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        match retry_after {
            Some(after) => {
                let after = after.min(Duration::from_secs(Self::MAX_RETRY_AFTER_S));
                after + jitter(after / 2 + Duration::from_millis(100))
            }
            None => jitter(ceiling),
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

fn jitter(max: Duration) -> Duration {
    let millis = max.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(fastrand::u64(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{ServerResponse, serve};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    fn quiet() -> Output {
        Output::with_sink("test", |_| {})
    }

    #[test]
    fn backoff_grows_with_jitter_and_respects_retry_after() {
        let mut b = Backoff::new();
        for ceiling in [200u64, 400, 800, 1600, 3200, 6400, 10_000, 10_000] {
            assert!(b.next(None) <= Duration::from_millis(ceiling));
        }
        let waits: Vec<Duration> = (0..50)
            .map(|_| b.next(Some(Duration::from_secs(2))))
            .collect();
        assert!(
            waits
                .iter()
                .all(|w| *w >= Duration::from_secs(2) && *w <= Duration::from_millis(3100))
        );
        assert!(waits.iter().any(|w| *w != waits[0]), "no jitter");
    }

    fn stub(
        answers: Vec<(u16, &'static str, Option<&'static str>)>,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let answers = Mutex::new(answers.into_iter());
        std::thread::spawn(move || {
            serve(listener, move |req| {
                log.lock().unwrap().push(format!(
                    "{} {} {}",
                    req.method,
                    req.path,
                    req.header("authorization").unwrap_or("")
                ));
                let (status, body, retry) =
                    answers.lock().unwrap().next().unwrap_or((500, "", None));
                let mut r = ServerResponse::text(status, body);
                if let Some(retry) = retry {
                    r.headers.push(("Retry-After".into(), retry.into()));
                }
                r
            })
        });
        (url, seen)
    }

    fn request() -> GrantRequest {
        GrantRequest {
            app: "shop".into(),
            env: "prod".into(),
            instance: "shop-blue-1".into(),
            uid: "u1".into(),
            ip: "10.0.0.7".into(),
        }
    }

    #[test]
    fn acquire_retries_busy_answers_then_succeeds() {
        let (url, seen) = stub(vec![
            (503, "busy", Some("0")),
            (429, "slow down", None),
            (
                201,
                r#"{"lease_id":"l-1","ttl_s":30,"grants":[{"db":"orders"}]}"#,
                None,
            ),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok\n").unwrap();
        let client = GrantClient::new(&url, &token, quiet()).unwrap();
        let lease = client
            .acquire(&request(), Instant::now() + Duration::from_secs(20))
            .unwrap();
        assert_eq!(lease.lease_id, "l-1");
        assert_eq!(lease.ttl_s, 30);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|s| s == "POST /api/v1/grants Bearer tok"));
    }

    #[test]
    fn a_huge_retry_after_gives_up_at_the_deadline_instead_of_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok").unwrap();
        let (url, seen) = stub(vec![(503, "busy", Some("18446744073709551615")); 3]);
        let client = GrantClient::new(&url, &token, quiet()).unwrap();
        let err = client
            .acquire(&request(), Instant::now() + Duration::from_secs(20))
            .unwrap_err();
        assert!(
            matches!(err, GrantError::Deadline { attempts: 1, .. }),
            "{err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
        let mut b = Backoff::new();
        assert!(b.next(Some(Duration::MAX)) <= Duration::from_secs(451));
    }

    #[test]
    fn acquire_fails_fast_on_refusal_and_at_the_deadline_when_busy() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok").unwrap();
        let (url, _) = stub(vec![(403, "not your pod", None)]);
        let client = GrantClient::new(&url, &token, quiet()).unwrap();
        let err = client
            .acquire(&request(), Instant::now() + Duration::from_secs(20))
            .unwrap_err();
        assert!(err.to_string().contains("HTTP 403: not your pod"), "{err}");

        let (url, _) = stub(vec![(503, "busy", Some("1")); 10]);
        let client = GrantClient::new(&url, &token, quiet()).unwrap();
        let err = client
            .acquire(&request(), Instant::now() + Duration::from_millis(1500))
            .unwrap_err();
        assert!(
            matches!(err, GrantError::Deadline { what: "grant", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("HTTP 503: busy"));
    }

    #[test]
    fn renew_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok").unwrap();
        let (url, seen) = stub(vec![
            (200, r#"{"ttl_s":60}"#, None),
            (404, "", None),
            (503, "", Some("0")),
            (404, "", None),
        ]);
        let client = GrantClient::new(&url, &token, quiet()).unwrap();
        assert_eq!(
            client.renew("l/1", 30).unwrap(),
            Renewal::Renewed { ttl_s: 60 }
        );
        assert_eq!(client.renew("l/1", 30).unwrap(), Renewal::Gone);
        client
            .revoke("l/1", Instant::now() + Duration::from_secs(10))
            .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0], "POST /api/v1/grants/l%2F1/renew Bearer tok");
        assert_eq!(seen[3], "DELETE /api/v1/grants/l%2F1 Bearer tok");
    }
}
