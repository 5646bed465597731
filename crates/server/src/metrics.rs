//! Request counters and latency histograms in the Prometheus text format.
//! Labels come from matched route templates (plus `unmatched`), never from
//! raw paths, so the number of series is bounded by the route table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the latency histogram buckets.
const BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Debug, Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is `+Inf`.
    buckets: [u64; BOUNDS.len() + 1],
    sum: f64,
    count: u64,
}

#[derive(Debug, Default)]
struct Series {
    requests: BTreeMap<(String, String, u16), u64>,
    durations: BTreeMap<String, Histogram>,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    in_flight: AtomicI64,
    series: Mutex<Series>,
}

/// Counts a request as in flight until dropped (also when the client goes
/// away mid-request).
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Empty metrics, with the uptime clock started.
    pub fn new() -> Metrics {
        Metrics {
            started: Instant::now(),
            in_flight: AtomicI64::new(0),
            series: Mutex::new(Series::default()),
        }
    }

    /// Marks a request as started; it is in flight until the guard drops.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// Counts one handled request.
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let mut series = self
            .series
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *series
            .requests
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        let histogram = series.durations.entry(route.to_string()).or_default();
        let slot = BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BOUNDS.len());
        histogram.buckets[slot] += 1;
        histogram.sum += seconds;
        histogram.count += 1;
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let series = self
            .series
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut out = String::new();
        out.push_str("# HELP keelson_http_requests_total HTTP requests handled, by method, route and status.\n");
        out.push_str("# TYPE keelson_http_requests_total counter\n");
        for ((method, route, status), n) in &series.requests {
            let _ = writeln!(
                out,
                "keelson_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(method),
                escape(route)
            );
        }
        out.push_str(
            "# HELP keelson_http_request_duration_seconds Time to handle a request, by route.\n",
        );
        out.push_str("# TYPE keelson_http_request_duration_seconds histogram\n");
        for (route, h) in &series.durations {
            let route = escape(route);
            let mut cumulative = 0;
            for (i, bound) in BOUNDS.iter().enumerate() {
                cumulative += h.buckets[i];
                let _ = writeln!(
                    out,
                    "keelson_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "keelson_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "keelson_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "keelson_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        out.push_str("# HELP keelson_http_requests_in_flight Requests being handled now.\n");
        out.push_str("# TYPE keelson_http_requests_in_flight gauge\n");
        let _ = writeln!(
            out,
            "keelson_http_requests_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        out.push_str("# HELP keelson_uptime_seconds Seconds since the server started.\n");
        out.push_str("# TYPE keelson_uptime_seconds gauge\n");
        let _ = writeln!(
            out,
            "keelson_uptime_seconds {}",
            self.started.elapsed().as_secs_f64()
        );
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets_are_cumulative() {
        let m = Metrics::new();
        m.observe("GET", "/api/v1/apps", 200, Duration::from_micros(500));
        m.observe("GET", "/api/v1/apps", 200, Duration::from_millis(30));
        m.observe("POST", "/api/v1/apps", 422, Duration::from_millis(2));
        let text = m.render();
        assert!(text.contains(
            "keelson_http_requests_total{method=\"GET\",route=\"/api/v1/apps\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "keelson_http_requests_total{method=\"POST\",route=\"/api/v1/apps\",status=\"422\"} 1"
        ));
        assert!(text.contains(
            "keelson_http_request_duration_seconds_bucket{route=\"/api/v1/apps\",le=\"0.001\"} 1"
        ));
        assert!(text.contains(
            "keelson_http_request_duration_seconds_bucket{route=\"/api/v1/apps\",le=\"0.05\"} 3"
        ));
        assert!(
            text.contains("keelson_http_request_duration_seconds_count{route=\"/api/v1/apps\"} 3")
        );
    }
}
