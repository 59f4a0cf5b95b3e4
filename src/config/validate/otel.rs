//! `[otel]`: the collector URL and the sampling ratio.

use super::Check;
use crate::config::OtelConfig;

pub(super) fn otel(o: OtelConfig, c: &mut Check<'_>) -> OtelConfig {
    let endpoint = o
        .endpoint
        .filter(|e| !e.trim().is_empty())
        .map(|e| c.url("otel.endpoint", &e));
    let ratio = o.sample_ratio;
    if !(0.0..=1.0).contains(&ratio) {
        c.push(
            "otel.sample_ratio",
            format!("{ratio} is out of range (0.0 to 1.0)"),
        );
    }
    OtelConfig {
        endpoint,
        sample_ratio: ratio,
    }
}
